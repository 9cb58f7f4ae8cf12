"""open_clip's BPE with only its first N merges, as a HuggingFace tokenizer shipped in the package
(mmpt/configs/tokenizers/clip-bpe-8k: `data.tokenizer: clip-bpe-8k`, the demo's).

    python data_pipelines/clip_bpe_tokenizer.py                     # rewrites clip-bpe-8k (8,000 merges)
    python data_pipelines/clip_bpe_tokenizer.py --check             # exit 1 if the shipped files are stale
    python data_pipelines/clip_bpe_tokenizer.py --merges 16000 --out my-tokenizer

Why: open_clip's 49,408-token vocabulary gives a small model two 49,408-row tables (text stem, caption
logits). In the 15M-parameter demo they were 12.6M parameters and about two thirds of a training step on
2 CPU cores. CLIP's merges are ordered by frequency on its web corpus, so its first N form the same tokenizer
with a smaller vocabulary (256 bytes, 256 word-final bytes, N merges, start and end): general English, not
fitted to any data set. At 8,000 merges common words (the ten digits' names among them) are one token and
rarer ones split ("pronouncing" -> pr on oun cing). Same byte-to-unicode map, lower-casing and `</w>`
word ends as open_clip's SimpleTokenizer; the text clean-up is the HuggingFace CLIP tokenizer's.
"""
from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "mmpt" / "configs" / "tokenizers" / "clip-bpe-8k"
MERGES = 8000


def build(out: Path, num_merges: int) -> int:
    import open_clip.tokenizer as oc
    from transformers import CLIPTokenizerFast

    lines = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]  # line 0 is a version header
    byte_chars = list(oc.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizerFast(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                model_max_length=77)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return len(tok)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merges", type=int, default=MERGES)
    ap.add_argument("--check", action="store_true", help="compare a fresh build with --out instead of writing")
    args = ap.parse_args(argv)
    if not args.check:
        print(f"{args.out}: {build(args.out, args.merges)} tokens")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        n = build(Path(tmp), args.merges)
        names = sorted(p.name for p in Path(tmp).iterdir())
        _, differ, missing = filecmp.cmpfiles(tmp, args.out, names, shallow=False)
    if differ or missing:
        print(f"{args.out}: differs from a fresh build ({', '.join(differ + missing)}); rerun without --check")
        return 1
    print(f"{args.out}: up to date ({n} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
