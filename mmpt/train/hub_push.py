"""Checkpoints to the Hub while training (train.hub): rank 0 stages every save, a background thread exports and
uploads it, and training waits only for the last push.

    NPROC=2 launchers/torchrun.sh train --config demo train.hub.repo=me/run train.hub.strategy=checkpoint

- Staging: right after a save, RUN/hub/<tag>/ becomes a run directory of that one checkpoint: hard links to the
  tag's files (no copy), `latest`, config.yaml and metrics.jsonl up to the step. Pruning and later saves cannot
  change what is being uploaded.
- The export runs in a subprocess (`python -m mmpt export --progress`): building the model there leaves the
  training process's RNG streams, memory and GIL alone. The upload is one huggingface_hub commit whose message
  names the step and the eval figures; it sends only files whose content changed, weights through LFS.
- Repo layout: the export at the top (what mmpt.from_pretrained reads); with `checkpoint` and `all_checkpoints`
  also checkpoint/{latest, config.yaml, metrics.jsonl, <tag>/...} (what train.resume_from reads). `checkpoint`
  keeps the newest resume point of an unfinished run: each save replaces the older tag in the same commit, and
  the save at train.steps pushes the export only, since a finished run has nothing to resume (resuming from the
  Hub repeats the last stretch bit for bit). `all_checkpoints` keeps every tag, the last one included.
- Failures: a failed push is one line, retried after backoff_s, 2*backoff_s, ... (not after 401/403: the token
  will not change). A save while a push is in flight replaces the push waiting behind it. While pushes fail
  every save says so; the end of the run names the last pushed step and mmpt exits 3.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmpt.config import Config
from mmpt.export import is_eval_metric
from mmpt.hub import HubError, commit_files, ensure_repo, remote_files
from mmpt.train.checkpoint import checkpoint_dir
from mmpt.train.resume import TAG_RE
from mmpt.train.runlog import read_metrics, truncate_metrics

CHECKPOINT = "checkpoint"  # the repo folder holding resumable checkpoints
# RUN/hub_incomplete: written when the run ends without its last push on the Hub. Workers still exit 0 (under
# torchrun a non-zero worker is a crash: restarts, error reports); the launchers turn the marker into exit 3.
MARKER = "hub_incomplete"
PERMANENT = (401, 403)  # retrying cannot help
TORCHRUN_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT"}


def staging_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "hub"


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.is_dir():
            _link_tree(item, dst / item.name)
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(item, dst / item.name)


def stage(out_dir: str | Path, tag: str, step: int) -> Path:
    """RUN/hub/<tag>/: a run directory holding just this checkpoint, as it is now (rank 0, after the save)."""
    out_dir = Path(out_dir)
    final = staging_dir(out_dir) / tag
    tmp = final.with_name(tag + ".tmp")
    for old in (tmp, final):
        shutil.rmtree(old, ignore_errors=True)
    _link_tree(checkpoint_dir(out_dir) / tag, checkpoint_dir(tmp) / tag)
    (checkpoint_dir(tmp) / "latest").write_text(tag)
    shutil.copy2(out_dir / "config.yaml", tmp / "config.yaml")
    if (out_dir / "metrics.jsonl").is_file():
        shutil.copy2(out_dir / "metrics.jsonl", tmp / "metrics.jsonl")
    truncate_metrics(tmp / "metrics.jsonl", step)
    os.replace(tmp, final)
    return final


def export_staged(staged: Path) -> Path:
    """staged/export/: the export with the progress so far in its card, made by a separate process."""
    out = staged / "export"
    cmd = [sys.executable, "-m", "mmpt", "export", "--run", str(staged), "--out", str(out), "--progress"]
    # Not a rank: without torchrun's variables nothing in it can join or wait for the training's process group.
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [x for x in (done.stderr or done.stdout).splitlines() if x.strip()]
        raise HubError(f"export of {staged.name} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return out


def with_checkpoint(strategy: str, final: bool) -> bool:
    return strategy == "all_checkpoints" or (strategy == "checkpoint" and not final)


def files_to_push(export: Path, resumable: Path | None) -> dict[str, Path]:
    """Path in the repo -> local file: the export, and the checkpoint of the staged run `resumable`."""
    files = {str(p.relative_to(export)): p for p in sorted(export.rglob("*")) if p.is_file()}
    if resumable is not None:
        ckpt = checkpoint_dir(resumable)
        files.update({f"{CHECKPOINT}/{p.relative_to(ckpt)}": p for p in sorted(ckpt.rglob("*")) if p.is_file()})
        files[f"{CHECKPOINT}/config.yaml"] = resumable / "config.yaml"
        files[f"{CHECKPOINT}/metrics.jsonl"] = resumable / "metrics.jsonl"
    return files


def stale_tags(remote: list[str], tag: str, strategy: str) -> list[str]:
    """Folders to delete in the same commit as a checkpoint: with `checkpoint`, every other tag."""
    if strategy != "checkpoint":
        return []
    tags = {p.split("/")[1] for p in remote if p.startswith(f"{CHECKPOINT}/") and p.count("/") >= 2}
    return [f"{CHECKPOINT}/{t}/" for t in sorted(tags) if t != tag and TAG_RE.fullmatch(t)]


def commit_message(step: int, records: list[dict]) -> str:
    """"mmpt step 20: loss 3.214, eval/zeroshot/image/val/top1 0.532": the step's loss and the latest evals."""
    loss = next((r["loss"] for r in reversed(records) if r.get("step") == step and "loss" in r), None)
    evals: dict = {}
    for record in records:
        evals.update({k: v for k, v in record.items() if is_eval_metric(k) and isinstance(v, (int, float))})
    figures = ([f"loss {loss:.4f}"] if loss is not None else []) + [f"{k} {v:.4g}" for k, v in sorted(evals.items())]
    return f"mmpt step {step}" + (": " + ", ".join(figures) if figures else "")


@dataclass
class Push:
    """What one commit sends: the export of `staged` (step `step`) and the checkpoint of `resumable` (None: no
    checkpoint/ change). A newer save that replaces a waiting push keeps its checkpoint when it has none itself
    (strategy checkpoint's last save sends the export only), so a resume point is never dropped."""
    step: int
    staged: Path | None
    resumable: Path | None
    resumable_step: int | None

    def absorb(self, older: Push) -> None:
        """Take over `older`, which is dropped: its checkpoint if this push has none; the rest of its staging is
        removed, and `older` holds nothing after."""
        if self.resumable is None and older.resumable is not None:
            self.resumable, self.resumable_step = older.resumable, older.resumable_step
        for path in {older.staged, older.resumable} - {self.staged, self.resumable, None}:
            shutil.rmtree(path, ignore_errors=True)  # type: ignore[arg-type]
        older.staged = older.resumable = None

    def clean(self) -> None:
        for path in {self.staged, self.resumable} - {None}:
            shutil.rmtree(path, ignore_errors=True)


def push_staged(push: Push, hub) -> str:
    """One commit; returns the commit URL. hub: the run's train.hub settings."""
    assert push.staged is not None, "a push handed on is never sent"
    ensure_repo(hub.repo, hub.private, hub.revision or None)  # before the export: a wrong token fails at once
    export = push.staged / "export"
    if not (export / "model.safetensors").is_file():
        export = export_staged(push.staged)
    delete = []
    message = commit_message(push.step, read_metrics(push.staged))
    remote = remote_files(hub.repo, hub.revision)
    if push.resumable is not None:
        tag = (checkpoint_dir(push.resumable) / "latest").read_text().strip()
        delete = stale_tags(list(remote), tag, hub.strategy)
        if push.resumable_step != push.step:
            message += f" (checkpoint of step {push.resumable_step})"
    else:
        message += " (export)"
    return commit_files(hub.repo, files_to_push(export, push.resumable), delete, message, hub.revision or None,
                        remote)


class Pusher:
    """Rank 0's background uploader. offer() after each save (milliseconds: staging only); finish() at the end
    waits for the last push and returns whether it reached the Hub. say: one line to the log."""

    def __init__(self, cfg: Config, say: Callable[[str], None]):
        self.hub, self.out_dir, self.say = cfg.train.hub, Path(cfg.train.out_dir), say
        shutil.rmtree(staging_dir(self.out_dir), ignore_errors=True)  # left by a run that died
        (self.out_dir / MARKER).unlink(missing_ok=True)
        self._cond = threading.Condition()
        self._queued: Push | None = None
        self._busy = False
        self._closing = False
        self.last_pushed: int | None = None
        self.last_resumable: int | None = None  # the step of the newest checkpoint/ pushed
        self.failing: str | None = None  # the last failure while the newest push has not succeeded
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # the training bar owns the terminal
        self._thread = threading.Thread(target=self._run, name="mmpt-hub-push", daemon=True)
        self._thread.start()

    def offer(self, step: int, tag: str, final: bool) -> None:
        if self.hub.strategy == "end" and not final:
            return
        staged = stage(self.out_dir, tag, step)
        resumable = with_checkpoint(self.hub.strategy, final)
        push = Push(step, staged, staged if resumable else None, step if resumable else None)
        with self._cond:
            if self._queued is not None:
                self.say(f"hub: step {step}'s push replaces step {self._queued.step}'s, which was waiting")
                push.absorb(self._queued)
            self._queued = push
            self._cond.notify_all()
        if self.failing:
            self.say(f"hub: pushes to {self.hub.repo} are failing ({self.failing}); last pushed step: "
                     f"{self.last_pushed if self.last_pushed is not None else 'none'}; training goes on")

    def finish(self, wait_s: float) -> bool:
        """Waits up to wait_s for the queued and in-flight pushes; says how it ended. True: the newest checkpoint
        offered is on the Hub."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while (self._queued is not None or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            pending = self._queued is not None or self._busy
            self._closing = True
            self._cond.notify_all()
        last = "none" if self.last_pushed is None else f"step {self.last_pushed}"
        if pending or self.failing:
            why = f"still pushing after {wait_s:.0f} s" if pending else self.failing
            line = (f"hub: the last push did not reach {self.hub.repo} ({why}); last pushed: {last}; the "
                    f"checkpoints stay in {checkpoint_dir(self.out_dir)}")
            self.say(line)
            (self.out_dir / MARKER).write_text(line + "\n")
            return False
        resumable = "" if self.last_resumable is None else f", resumable checkpoint of step {self.last_resumable}"
        self.say(f"hub: {self.hub.repo} holds the export of {last}{resumable} (strategy {self.hub.strategy})")
        return True

    def _take(self) -> Push | None:
        with self._cond:
            while self._queued is None and not self._closing:
                self._cond.wait()
            push, self._queued = self._queued, None
            self._busy = push is not None
            return push

    def _run(self) -> None:
        while (push := self._take()) is not None:
            try:
                self._push_with_retries(push)
            finally:
                push.clean()
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _push_with_retries(self, push: Push) -> None:
        for attempt in range(self.hub.retries + 1):
            try:
                began = time.monotonic()
                url = push_staged(push, self.hub)
            except Exception as e:  # noqa: BLE001 (a push must never end the run: every failure is one line)
                self.failing = " ".join(str(e).split()) or type(e).__name__
                wait = self.hub.backoff_s * 2 ** attempt
                last = attempt == self.hub.retries or getattr(e, "status", None) in PERMANENT
                self.say(f"hub: push of step {push.step} failed (try {attempt + 1} of {self.hub.retries + 1}): "
                         f"{self.failing}" + ("" if last else f"; retrying in {wait:.3g} s"))
                if last or self._handed_on(push, wait):
                    return
                continue
            self.last_pushed, self.failing = push.step, None
            self.last_resumable = push.resumable_step if push.resumable is not None else self.last_resumable
            self.say(f"hub: pushed step {push.step} to {self.hub.repo} in {time.monotonic() - began:.1f} s: {url}")
            return

    def _handed_on(self, push: Push, seconds: float) -> bool:
        """Sleeps through a backoff. True (stop retrying) once the run ends, or once a newer save is waiting: it
        takes this push over (its checkpoint too, when it has none)."""
        with self._cond:
            self._cond.wait_for(lambda: self._queued is not None or self._closing, timeout=seconds)
            if self._queued is not None:
                self.say(f"hub: step {self._queued.step}'s push replaces step {push.step}'s, which was retrying")
                self._queued.absorb(push)
                return True
            return self._closing
