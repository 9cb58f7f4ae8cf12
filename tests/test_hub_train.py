"""Checkpoints reach the Hub while training (train.hub) and a fresh directory resumes from them (train.resume_from),
against the Hub test double (tests/hub_server.py) speaking the large-file protocol.

Every run is the real stack: torchrun, 2 gloo processes, DeepSpeed ZeRO-3, webdataset, huggingface_hub; the Hub
side is a real HTTP server in this process that fails on purpose (500s, a death mid-upload, slowness, a token it
refuses). Losses of a resumed run are compared bit for bit with the straight run that pushed the checkpoint."""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

from mmpt.errors import DataError
from mmpt.train.consolidate import consolidated_state_dict
from mmpt.train.hub_push import commit_message, stale_tags
from mmpt.train.hub_resume import check_pickles, place
from mmpt.train.runlog import read_metrics
from tests.conftest import run
from tests.hub_server import HubServer
from tests.test_recovery import args, losses, train

pytestmark = pytest.mark.slow
TOKEN = "hf_mmptTrainToken5Jq3Lm"
HUB = ["train.ckpt_every=4", "train.hub.backoff_s=0.5", "train.hub.retries=4", "model.moe.last=0"]


def hub_env(hub: HubServer, tmp_path: Path, token: str = TOKEN) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost"}


def hub_lines(proc) -> list[str]:
    return [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("hub:")]


@pytest.fixture(scope="module")
def pushed(demo_data, tmp_path_factory):
    """An 8-step run pushing with strategy checkpoint through 500s and a server that dies mid-upload."""
    tmp = tmp_path_factory.mktemp("hubtrain")
    hub = HubServer(tmp / "hub", tokens=[TOKEN]).__enter__()
    hub.fail(2, 500)  # create_repo and the first preupload fail
    hub.die_mid_upload(2.0)  # then the first LFS upload is cut and the server is gone for 2 s
    proc = train(demo_data, tmp / "a", 8, *HUB, "train.hub.repo=me/run", "train.hub.strategy=checkpoint",
                 **hub_env(hub, tmp))
    yield hub, tmp, proc
    hub.__exit__()


def test_pushes_survive_500s_and_a_server_dying_mid_upload(pushed):
    hub, tmp, proc = pushed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = hub_lines(proc)
    assert any("push of step 4 failed (try 1 of 5)" in x and "500" in x and "retrying in" in x for x in lines), lines
    # Step 4's push either lands, or is still retrying when step 8's is saved, which takes it over.
    assert any(x.startswith("hub: pushed step 4 to me/run") or "step 8's push replaces step 4's" in x
               for x in lines), "\n".join(lines)
    assert hub.deaths == 1  # an upload was cut half-way, and the server was gone for 2 s
    assert lines[-1] == "hub: me/run holds the export of step 8, resumable checkpoint of step 4 (strategy checkpoint)"
    files = hub.files("me/run")
    assert {"model.safetensors", "config.json", "README.md", "checkpoint/latest", "checkpoint/config.yaml",
            "checkpoint/metrics.jsonl", "checkpoint/step0000004/rank_00000.pt", "checkpoint/step0000004/rank_00001.pt"
            } <= set(files)
    assert files["checkpoint/latest"] == b"step0000004"
    assert max(r["step"] for r in map(json.loads, files["checkpoint/metrics.jsonl"].splitlines())) == 4
    assert "Trained to step 8 of 8 so far." in files["README.md"].decode()
    assert TOKEN not in proc.stdout + proc.stderr


def test_weights_take_lfs_and_each_push_is_one_commit(pushed):
    """The step-8 save lands while step 4's push is in flight or retrying: either it waits and goes as its own
    commit, or it takes step 4's over, keeping its checkpoint. Either way one commit per push, weights by LFS."""
    hub, _, _ = pushed
    assert re.fullmatch(r"mmpt step 4: loss \d+\.\d{4}", hub.commits[0]["summary"]) or len(hub.commits) == 1
    last = hub.commits[-1]
    assert last["summary"].startswith("mmpt step 8: loss ")
    assert last["summary"].endswith("(export)" if len(hub.commits) == 2 else "(checkpoint of step 4)"), hub.commits
    sent_lfs = {p for c in hub.commits for p in c["lfs"]}
    assert {"model.safetensors", "checkpoint/step0000004/rank_00000.pt"} <= sent_lfs
    assert not any(p.endswith((".pt", ".safetensors")) for c in hub.commits for p in c["regular"])
    assert len(hub.lfs_uploads) == len(set(hub.lfs_uploads))  # no object uploaded twice


PUSH_TWICE = """
import sys, pathlib
from mmpt.hub import commit_files, ensure_repo, remote_files
folder = pathlib.Path(sys.argv[1])
ensure_repo("me/twice")
files = {p.name: p for p in folder.iterdir()}
commit_files("me/twice", files, [], "first", remote=remote_files("me/twice"))
(folder / "notes.txt").write_text("changed")
commit_files("me/twice", files, [], "second", remote=remote_files("me/twice"))
"""


def test_only_changed_files_are_sent(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(1 << 16))
    (folder / "notes.txt").write_text("first")
    (folder / "config.json").write_text("{}")
    with HubServer(tmp_path / "hub", tokens=[TOKEN]) as hub:
        proc = run([sys.executable, "-c", PUSH_TWICE, str(folder)], env=hub_env(hub, tmp_path), timeout=120)
        assert proc.returncode == 0, proc.stderr
        first, second = hub.commits
        assert (first["lfs"], first["regular"]) == (["model.safetensors"], ["config.json", "notes.txt"])
        assert (second["lfs"], second["regular"]) == ([], ["notes.txt"])
        assert len(hub.lfs_uploads) == 1
        assert hub.files("me/twice")["notes.txt"] == b"changed"


def test_resume_from_the_hub_continues_bit_for_bit(pushed, demo_data):
    hub, tmp, straight = pushed
    proc = train(demo_data, tmp / "b", 8, *HUB, "train.resume_from=hf-hub:me/run", **hub_env(hub, tmp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.resume_from: step0000004 of hf-hub:me/run placed in" in proc.stdout
    assert losses(tmp / "b") == losses(tmp / "a")  # steps 1-4 downloaded, 5-8 trained again: equal bits
    assert [m["step"] for m in read_metrics(tmp / "b") if "loss" in m] == list(range(1, 9))  # each step once


def test_resume_from_the_hub_on_another_world_size(pushed, demo_data):
    """One process takes the 2-rank checkpoint through DeepSpeed's universal format; the weights it then holds
    (saved at once in the 1-rank layout) are the pushed step's, bit for bit."""
    hub, tmp, _ = pushed
    proc = train(demo_data, tmp / "c", 4, *HUB, "train.resume_from=hf-hub:me/run", nproc=1, **hub_env(hub, tmp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = consolidated_state_dict(tmp / "c" / "checkpoints", "step0000004")
    pushed_weights = consolidated_state_dict(tmp / "a" / "checkpoints", "step0000004")
    assert ours.keys() == pushed_weights.keys()
    assert all(torch.equal(ours[k], pushed_weights[k]) for k in ours)


def test_slow_server_never_slows_training_and_replaces_the_waiting_push(demo_data, tmp_path):
    """Every request takes 1 s: the push of step 2 takes far longer than the steps after it, which all run
    meanwhile; saves at 4 and 6 land while it is in flight, so 6 replaces 4; the end waits for step 8's push."""
    with HubServer(tmp_path / "hub", tokens=[TOKEN]) as hub:
        hub.delay_s = 1.0
        proc = train(demo_data, tmp_path / "a", 8, *HUB, "train.ckpt_every=2", "train.hub.repo=me/slow",
                     "train.hub.strategy=every_save", **hub_env(hub, tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        first_commit = hub.commits[0]["time"]
        summaries = [c["summary"].split(":")[0] for c in hub.commits]
    trained = {m["step"]: m["time"] for m in read_metrics(tmp_path / "a") if "loss" in m}
    assert all(trained[s] < first_commit for s in range(3, 9)), (trained, first_commit)
    assert summaries[0] == "mmpt step 2" and summaries[-1] == "mmpt step 8" and "mmpt step 4" not in summaries
    assert any("step 6's push replaces step 4's" in x for x in hub_lines(proc)), hub_lines(proc)


def test_a_wrong_token_is_one_line_and_training_goes_on(demo_data, tmp_path):
    with HubServer(tmp_path / "hub", tokens=[TOKEN]) as hub:
        proc = train(demo_data, tmp_path / "a", 8, *HUB, "train.ckpt_every=2", "train.hub.repo=me/run",
                     **hub_env(hub, tmp_path, "hf_bad1"))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mmpt: training finished, but the Hub lacks its last push" in proc.stderr
    lines = hub_lines(proc)
    failures = [x for x in lines if "failed (try 1 of 5)" in x]
    assert len(failures) >= 2 and all("401" in x and "check the token" in x and "retrying" not in x for x in failures)
    assert any("pushes to me/run are failing" in x and "last pushed step: none" in x for x in lines), lines
    assert lines[-1].startswith("hub: the last push did not reach me/run") and "last pushed: none" in lines[-1]
    assert [s for s, _ in losses(tmp_path / "a")] == list(range(1, 9))
    assert "hf_bad1" not in proc.stdout + proc.stderr


def test_resume_from_a_repo_without_a_checkpoint_is_one_line(demo_data, tmp_path):
    with HubServer(tmp_path / "hub", tokens=[TOKEN]) as hub:
        hub.store.create("me/model", private=False)
        proc = run([sys.executable, "-m", "mmpt.cli", *args(demo_data, tmp_path / "a", 4, *HUB,
                                                            "train.resume_from=hf-hub:me/model")],
                   env={**hub_env(hub, tmp_path), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [x for x in proc.stderr.splitlines() if "error" in x] == [
        "mmpt train: error: train.resume_from=hf-hub:me/model: the repo holds no checkpoint/latest (push checkpoints "
        "with train.hub.strategy=checkpoint or all_checkpoints)"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmpt-should-never-exist",))


class _Fetcher:
    """getattr is how a pickle reaches a function no global names (module.__dict__, __globals__, ...)."""
    def __reduce__(self):
        return (getattr, (1, "real"))


def test_a_checkpoint_naming_other_code_is_refused_unloaded(tmp_path):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step0000004"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"rng": _Evil()}, tag / "rank_00000.pt")
    (run / "checkpoints" / "latest").write_text("step0000004")
    with pytest.raises(DataError, match=r"rank_00000.pt: names (posix|os)\.system.*train.trust_checkpoint=true"):
        check_pickles(tag, "local-dir:x")
    torch.save({"rng": _Fetcher()}, tag / "rank_00000.pt")
    with pytest.raises(DataError, match=r"rank_00000.pt: names builtins\.getattr"):
        check_pickles(tag, "local-dir:x")
    (tag / "rank_00000.pt").write_bytes(pickle.dumps({"rng": _Evil()}))  # the legacy format: not inspectable
    with pytest.raises(DataError, match=r"rank_00000.pt: names \(a pickle that is not torch.save's zip format\)"):
        check_pickles(tag, "local-dir:x")
    with pytest.raises(DataError, match="trust_checkpoint"):
        place(f"local-dir:{run}", tmp_path / "new", trust=False, say=print)
    assert not Path("/tmp/mmpt-should-never-exist").exists()
    assert not (tmp_path / "new" / "checkpoints" / "step0000004").exists()


def test_commit_message_and_stale_tags():
    records = [{"step": 4, "loss": 3.25, "lr": 1e-3}, {"step": 4, "eval/zeroshot/image/val/top1": 0.5,
                                                       "eval/zeroshot/image/val/num_samples": 297}]
    assert commit_message(4, records) == "mmpt step 4: loss 3.2500, eval/zeroshot/image/val/top1 0.5"
    remote = ["README.md", "checkpoint/latest", "checkpoint/step0000002/a.pt", "checkpoint/step0000004/a.pt"]
    assert stale_tags(remote, "step0000004", "checkpoint") == ["checkpoint/step0000002/"]
    assert stale_tags(remote, "step0000004", "all_checkpoints") == []
