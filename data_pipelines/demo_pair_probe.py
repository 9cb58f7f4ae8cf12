"""What each side of the demo's video-audio pair knows: the digit, the direction, both, and the R@1 that allows.

    python data_pipelines/demo_pair_probe.py runs/demo
    python data_pipelines/demo_pair_probe.py runs/demo --json runs/demo/pair_probe.json

A motion clip's soundtrack says its digit and direction and nothing else of it, so embeddings that knew both
perfectly would still pick among the held-out clips of one (digit, direction) group by chance: the `ceiling`
R@1. Where video-audio R@1 stops below it, this says which side lacks which attribute. On data/demo/motion-val,
for a trained run:

- each side's zero-shot reading: the nearest of the 40 prompts "the digit {word} moving {direction}" (a training
  caption's phrasing), scored on digit, direction and both;
- each side's linear probe per attribute (logistic regression fitted on the embeddings of data/demo/motion-train,
  scored on the held-out clips): what the embedding holds, whether or not it lines up with text;
- the pair: how often video->audio top-1 lands in the query's group, R@1 each way (the retrieval eval's own
  ranking), and the ceiling;
- the text side: the prompts' mean cosine when they share the digit (other direction) and when they share the
  direction (other digit), i.e. which attribute the text embedding is built around.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # demo_digits, demo_media beside this file

from demo_digits import MOTION_CAPTIONS, WORDS  # noqa: E402
from demo_media import DIRECTIONS  # noqa: E402

from mmpt.eval.data import eval_batches  # noqa: E402
from mmpt.eval.retrieval import class_only_r1, embed_pairs, gather_unique, retrieval_metrics  # noqa: E402
from mmpt.eval.zeroshot import class_embeddings  # noqa: E402

PROMPT = MOTION_CAPTIONS[0]  # "the digit {word} moving {direction}"
DIRS = sorted(DIRECTIONS)
SIDES = ("video", "audio")


def clip_groups(data: str | Path, keys: list) -> torch.Tensor:
    """Each clip's (digit, direction) group, digit * 4 + direction index, read from its json."""
    meta = {}
    for shard in sorted(Path(data).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta[member.name.rsplit("/", 1)[-1][:-5]] = json.load(tar.extractfile(member))
    return torch.tensor([meta[k]["label"] * len(DIRS) + DIRS.index(meta[k]["direction"]) for k in keys])


def embed_clips(model, cfg, data: str | Path) -> tuple[list, dict]:
    """Keys (sorted, as the retrieval eval orders them) and each side's unit embeddings."""
    batches = eval_batches(str(data), list(SIDES), cfg, cfg.eval.batch_size, 0, labels=False)
    keys, video, audio, _, _ = gather_unique(*embed_pairs(model, batches, *SIDES))
    return keys, {"video": video, "audio": audio}


def prompt_embeddings(model, cfg) -> torch.Tensor:
    """(40, E): the prompt of every group, in group order."""
    prompts = [PROMPT.format(word=w, direction=d) for w in WORDS for d in DIRS]
    return class_embeddings(model, prompts, ["{}"], cfg.model.context_length, cfg.data.tokenizer)


def accuracy(guess: torch.Tensor, truth: torch.Tensor) -> float:
    return float((guess == truth).double().mean())


def named(emb: torch.Tensor, prompts: torch.Tensor, groups: torch.Tensor) -> dict:
    """Digit, direction and both of the nearest prompt, against each clip's group."""
    guess = (emb @ prompts.t()).argmax(1)
    n = len(DIRS)
    return {"digit": accuracy(guess // n, groups // n), "direction": accuracy(guess % n, groups % n),
            "both": accuracy(guess, groups)}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(train_x.numpy(), train_y.numpy())
    return float(clf.score(val_x.numpy(), val_y.numpy()))


def probes(train: tuple, val: tuple) -> dict:
    """side -> {digit, direction}: held-out accuracy of a probe fitted on the training clips."""
    (train_emb, train_groups), (val_emb, val_groups) = train, val
    n = len(DIRS)
    return {side: {name: linear_probe(train_emb[side], split(train_groups), val_emb[side], split(val_groups))
                   for name, split in (("digit", lambda g: g // n), ("direction", lambda g: g % n))}
            for side in SIDES}


def pair_scores(emb: dict, groups: torch.Tensor) -> dict:
    """Video->audio top-1 in the query's group, R@1 both ways, and the group ceiling."""
    sim = emb["video"] @ emb["audio"].t()
    video_to_audio, audio_to_video = retrieval_metrics(sim)
    return {"top1_in_group": accuracy(groups[sim.argmax(1)], groups), "video_to_audio_R@1": video_to_audio["R@1"],
            "audio_to_video_R@1": audio_to_video["R@1"], "ceiling_R@1": class_only_r1(groups.tolist())}


def text_similarity(prompts: torch.Tensor) -> dict:
    """Mean cosine of prompt pairs sharing only the digit, and sharing only the direction."""
    sim, n = prompts @ prompts.t(), len(DIRS)
    group = torch.arange(prompts.size(0))
    digit, direction = group // n, group % n
    same_digit = (digit[:, None] == digit[None]) & (direction[:, None] != direction[None])
    same_direction = (digit[:, None] != digit[None]) & (direction[:, None] == direction[None])
    return {"same_digit": float(sim[same_digit].mean()), "same_direction": float(sim[same_direction].mean())}


def probe(model, cfg, data: str | Path, train: str | Path | None = None) -> dict:
    """Every figure of the module docstring for `model` on held-out `data` (probes only with `train`)."""
    keys, emb = embed_clips(model, cfg, data)
    groups, prompts = clip_groups(data, keys), prompt_embeddings(model, cfg)
    result = {"data": str(data), "num_clips": len(keys), "prompt": PROMPT,
              "zeroshot": {side: named(emb[side], prompts, groups) for side in SIDES},
              "pair": pair_scores(emb, groups), "text": text_similarity(prompts)}
    if train:
        train_keys, train_emb = embed_clips(model, cfg, train)
        result["probe"] = probes((train_emb, clip_groups(train, train_keys)), (emb, groups))
    return result


def report(run: str, r: dict) -> str:
    lines = [f"what each side of {run} knows ({r['data']}, {r['num_clips']} clips; prompts '{r['prompt']}')",
             f"  {'':6} {'zero-shot digit / direction / both':<38} linear probe digit / direction"]
    for side in SIDES:
        z, p = r["zeroshot"][side], r.get("probe", {}).get(side)
        fitted = f"{p['digit']:.2f} / {p['direction']:.2f}" if p else "(no --train)"
        lines.append(f"  {side:<6} {z['digit']:.2f} / {z['direction']:.2f} / {z['both']:.2f}{'':20} {fitted}")
    p, t = r["pair"], r["text"]
    lines.append(f"  video->audio top-1 in the query's (digit, direction) group {p['top1_in_group']:.2f}; R@1 "
                 f"video->audio {p['video_to_audio_R@1']:.2f}, audio->video {p['audio_to_video_R@1']:.2f}; "
                 f"ceiling {p['ceiling_R@1']:.2f}")
    lines.append(f"  text: prompts sharing the digit (other direction) cosine {t['same_digit']:.2f}, sharing the "
                 f"direction (other digit) {t['same_direction']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a trained run directory or any model source `mmpt eval --model` takes")
    ap.add_argument("--data", default="data/demo/motion-val", help="held-out motion clips")
    ap.add_argument("--train", default="data/demo/motion-train", help="clips the probes are fitted on ('': none)")
    ap.add_argument("--json", help="write the figures to this file too")
    args = ap.parse_args(argv)
    from mmpt.hub import load_model

    model, cfg = load_model(args.run)
    result = probe(model, cfg, args.data, args.train or None)
    print(report(args.run, result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
