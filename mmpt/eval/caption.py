"""Captioning eval: the CoCa decoder writes a caption for every sample of a modality in held-out shards, scored
against the sample's reference captions with BLEU-4 and CIDEr (pycocoevalcap's scorers).

    mmpt eval caption --model runs/demo --modality image --beams 3 --out runs/demo/caption.json
    eval: {every: 100, caption: [{modality: image, data: data/demo/val}]}   # during training: eval/caption/...

The result (and `--out`) holds the scores and, like a COCO result file, every sample's hypothesis with its
references, so each caption can be inspected.

References of a sample: its caption file (the text modality's key, `txt`) plus every string in
`json["captions"]` when the sample's json has such a list (COCO-style datasets with several captions per
image), duplicates dropped. The batches of `eval_loader` carry only token ids (truncated to the context
length), so the raw texts are read from this rank's shards in a second pass over them (text and json only
are kept; media are not decoded).

Text normalisation: COCO's evaluation tokenises with PTBTokenizer, which needs Java. Here hypotheses and
references are lower-cased, punctuation becomes spaces and whitespace is collapsed ("A dog's toy." ->
"a dog s toy"), close to PTB's output except for contractions (PTB: "dog 's"). Scores are comparable across
mmpt runs; against numbers computed with PTBTokenizer they may differ slightly.

Under torch.distributed every rank captions its split; the (key, hypothesis, references) records of all
ranks are gathered, de-duplicated by key, and every rank scores the same corpus, so every rank returns the
same result.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import webdataset as wds

from mmpt import modality as registry
from mmpt.data.media import DecodeSettings
from mmpt.data.shards import list_shards
from mmpt.data.stream import eval_loader
from mmpt.data.tokenizer import OPENCLIP, decode
from mmpt.distributed import gather_objects
from mmpt.errors import DataError
from mmpt.eval.data import model_inputs, progress
from mmpt.evals import Eval, count, register

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lower-case, punctuation -> spaces, whitespace collapsed (the Java-free stand-in for PTBTokenizer)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def score_captions(hypotheses: dict, references: dict) -> dict:
    """{id: hypothesis str}, {id: [reference str, ...]} -> {"bleu4", "cider"} over the corpus, after `normalize`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [normalize(h)] for k, h in hypotheses.items()}
    gts = {k: [normalize(r) for r in references[k]] for k in res}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def _json_captions(raw) -> list:
    """json["captions"] if the sample's json is an object holding a list there; other json is no caption."""
    try:
        meta = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return []  # eval_loader counts bad json; its sample is dropped there
    captions = meta.get("captions") if isinstance(meta, dict) else None
    return [c.strip() for c in captions if isinstance(c, str)] if isinstance(captions, list) else []


def read_references(data: str) -> dict:
    """{sample key: [reference captions]} for this rank's shards (the same split by node as `eval_loader`)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(list_shards(data)), wds.split_by_node,
                                wds.tarfile_to_samples(handler=wds.ignore_and_continue))
    refs = {}
    for sample in pipeline:
        key, _ = registry.sample_key(sample, registry.TEXT)
        texts = [sample[key].decode("utf-8", errors="replace").strip()] if key else []
        texts += _json_captions(sample.get("json"))
        refs[sample["__key__"]] = list(dict.fromkeys(t for t in texts if t))
    return refs


@torch.no_grad()
def generate_captions(model, loader, modality: str, num_beams: int, max_len: int | None,
                      context_length: int, tokenizer: str = OPENCLIP) -> tuple[list, int]:
    """[(key, hypothesis, caption decoded from the batch's token ids)] and the number of skipped samples."""
    records, skipped = [], 0
    for batch in progress(loader, "caption"):
        skipped += sum(batch["_skipped"]["reasons"].values())
        if not batch["__key__"]:  # only bad samples in this batch
            continue
        # The path zero-shot and retrieval take: uint8 media stay uint8, so the encoder normalises them.
        ids = model.caption(modality, model_inputs(model, batch, modality), max_len, num_beams)
        for key, row, text in zip(batch["__key__"], ids.tolist(), batch[registry.TEXT].tolist(), strict=True):
            records.append((key, decode(row, context_length, tokenizer), decode(text, context_length, tokenizer)))
    return records, skipped


def _check_model(model, cfg, modality: str, num_beams: int, max_len: int | None) -> None:
    others = [m for m in cfg.model.modalities if m != registry.TEXT]
    if getattr(model, "decoder", None) is None:
        raise DataError(f"caption eval: the model has no caption decoder (model.modalities={cfg.model.modalities}, "
                        f"model.decoder_cross_layers={cfg.model.decoder_cross_layers}; it needs text and >= 1)")
    if modality not in others:
        raise DataError(f"--modality {modality}: captioning needs one of the model's non-text modalities "
                        f"{', '.join(others)}")
    if num_beams < 1:
        raise DataError(f"--beams {num_beams}: must be at least 1")
    if max_len is not None and not 2 <= max_len <= cfg.model.context_length:
        raise DataError(f"--max-len {max_len}: must be in 2..{cfg.model.context_length} (model.context_length)")


def run_caption(model, cfg, modality: str, data: str, batch_size: int | None = None, num_beams: int = 1,
                max_len: int | None = None, workers: int | None = None) -> dict:
    """Caption every `modality` sample of the shards `data` (greedy, or beam search with num_beams > 1) and
    score BLEU-4 and CIDEr. batch_size / workers default to eval.batch_size / eval.workers, max_len to
    model.context_length. Returns {"bleu4", "cider", "num_samples", "modality", "num_beams", "max_len", "data",
    "skipped", "samples": every sample by key as {"key", "hypothesis", "references"}} (all of them, as COCO
    result files hold every caption, so `--out` can be inspected sample by sample)."""
    _check_model(model, cfg, modality, num_beams, max_len)
    was_training = model.training
    model.eval()
    try:
        loader = eval_loader(data, [modality, registry.TEXT], DecodeSettings.from_config(cfg),
                             batch_size or cfg.eval.batch_size, cfg.eval.workers if workers is None else workers)
        records, skipped = generate_captions(model, loader, modality, num_beams, max_len, cfg.model.context_length,
                                             cfg.data.tokenizer)
    finally:
        model.train(was_training)
    refs = read_references(data)
    # A sample missing from the second pass (its shard changed meanwhile) keeps its tokenised caption.
    local = [(key, hyp, refs.get(key) or [text]) for key, hyp, text in records]
    merged: dict = {}
    total_skipped = 0
    for part, part_skipped in gather_objects((local, skipped)):
        total_skipped += part_skipped
        for key, hyp, ref in part:
            merged.setdefault(key, (hyp, ref))
    if not merged:
        raise DataError(f"caption eval: no {modality} sample with a caption in {data}")
    keys = sorted(merged)
    result = score_captions({k: merged[k][0] for k in keys}, {k: merged[k][1] for k in keys})
    samples = [{"key": k, "hypothesis": merged[k][0], "references": merged[k][1]} for k in keys]
    result.update(num_samples=len(keys), modality=modality, num_beams=num_beams,
                  max_len=max_len or cfg.model.context_length, data=data, skipped=total_skipped, samples=samples)
    return result


@dataclass
class CaptionEval:
    """One captioning eval (eval.caption[i]; `mmpt eval caption`): greedy (num_beams 1) is the cheap one to run
    during training."""
    modality: str = "image"
    data: Optional[str] = None  # shards with captions; None: data.val
    num_beams: int = 1
    max_len: Optional[int] = None  # generated tokens at most; None: model.context_length


def _check(cfg, item: CaptionEval) -> Optional[str]:
    m = cfg.model
    if registry.TEXT not in m.modalities or m.decoder_cross_layers < 1:  # the model builds no decoder then
        return (f"modality={item.modality!r}: captioning needs the caption decoder, which needs text in "
                f"model.modalities={m.modalities} and model.decoder_cross_layers >= 1 (it is "
                f"{m.decoder_cross_layers})")
    others = [x for x in m.modalities if x != registry.TEXT]
    if item.modality not in others:
        return f"modality={item.modality!r}: must be a non-text modality of model.modalities={m.modalities}"
    if item.num_beams < 1:
        return f"num_beams={item.num_beams}: must be at least 1"
    if item.max_len is not None and not 2 <= item.max_len <= m.context_length:
        return f"max_len={item.max_len}: must be in 2..{m.context_length} (model.context_length)"
    return None


def _inputs(cfg, item: CaptionEval) -> None:
    list_shards(item.data or cfg.data.val)  # references are read from shards only


def _run(model, cfg, item: CaptionEval, out: str | None = None, **options) -> dict:
    return run_caption(model, cfg, item.modality, item.data or cfg.data.val, num_beams=item.num_beams,
                       max_len=item.max_len, **options)


def _flags(p) -> None:
    p.add_argument("--modality", default="image")
    p.add_argument("--data", help="shards with captions (default: data.val)")
    p.add_argument("--beams", dest="num_beams", metavar="BEAMS", type=count(1), default=1, help="1: greedy")
    p.add_argument("--max-len", dest="max_len", type=count(2))


def _summary(result: dict) -> str:
    return f"caption BLEU-4 {result['bleu4']:.3f} CIDEr {result['cider']:.3f} on {result['num_samples']} samples"


register(Eval("caption", CaptionEval, _run, check=_check, inputs=_inputs, metrics=("bleu4", "cider"),
              label=lambda cfg, item: f"{item.modality}/{Path(item.data or cfg.data.val).name}",
              task=("{modality}-to-text", "{modality} captioning"), summary=_summary, cli=_flags,
              help="captions generated for a modality, BLEU-4 and CIDEr"))
