"""Text tokenizers: open_clip's BPE by default (its vocab ships in the wheel, so it works offline), a
HuggingFace tokenizer loaded from a local directory (`data.tokenizer: /path/to/tokenizer`), or one shipped in
the package by name (`data.tokenizer: clip-bpe-8k`, mmpt/configs/tokenizers/clip-bpe-8k: open_clip's BPE cut
to its first 8,000 merges, the demo's)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from mmpt.errors import ConfigError

OPENCLIP = "openclip"
PACKAGED = Path(__file__).resolve().parent.parent / "configs" / "tokenizers"


def packaged() -> list:
    return sorted(p.name for p in PACKAGED.iterdir() if p.is_dir()) if PACKAGED.is_dir() else []


def resolve(name: str) -> str:
    """"openclip", or the directory of a HuggingFace tokenizer: `name` itself, else the packaged one so named."""
    if name == OPENCLIP or os.path.isdir(name):
        return name
    if name in packaged():
        return str(PACKAGED / name)
    raise FileNotFoundError(f"tokenizer '{name}': not 'openclip', not a local tokenizer directory and not one "
                            f"shipped with mmpt ({', '.join(packaged()) or 'none'})")


@functools.lru_cache(maxsize=4)
def _openclip(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class Tokenizer:
    """`encode(text) -> (L,) int64`: SOT ... EOT then padding (0), truncated with EOT kept."""

    def __init__(self, name: str = OPENCLIP, context_length: int = 16):
        self.name, self.context_length = name, context_length
        if name == OPENCLIP:
            tok = _openclip(context_length)
            self.sot_id, self.eot_id, self.vocab_size = tok.sot_token_id, tok.eot_token_id, tok.vocab_size
            self._hf = None
        else:
            self._hf = _load_hf(resolve(name))
            self.sot_id = self._hf.bos_token_id if self._hf.bos_token_id is not None else self._hf.cls_token_id
            self.eot_id = self._hf.eos_token_id if self._hf.eos_token_id is not None else self._hf.sep_token_id
            self.vocab_size = len(self._hf)
            _check_special_ids(name, self.sot_id, self.eot_id)

    def batch(self, texts: list) -> torch.Tensor:
        if self._hf is None:
            return _openclip(self.context_length)(texts)
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            body = self._hf(text, add_special_tokens=False)["input_ids"][: self.context_length - 2]
            row = [self.sot_id, *body, self.eot_id]
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def encode(self, text: str) -> torch.Tensor:
        return self.batch([text])[0]

    def decode(self, ids: list) -> str:
        """Token ids (with or without <start>, up to <end> or the end) -> text."""
        ids = [i for i in ids if i != self.sot_id]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        if self._hf is None:
            return _openclip(self.context_length).decode(ids).strip()
        return self._hf.decode(ids, skip_special_tokens=True).strip()


def _load_hf(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:  # no or unreadable tokenizer files in the directory
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        if len(why) > 100:  # transformers' messages go on to list every converter it has
            why = why[:100].rsplit(" ", 1)[0] + " ..."
        raise ConfigError(f"data.tokenizer '{name}': not a loadable HuggingFace tokenizer directory ({why})") from None


def _check_special_ids(name: str, sot, eot) -> None:
    """Captions are SOT ... EOT and the text mask ends at the first EOT (`mmpt.model.stems.valid_mask`): a
    tokenizer without both tokens, or with one id for both (GPT-2's bos == eos), would leave every caption empty."""
    if sot is None or eot is None:
        raise ConfigError(f"data.tokenizer '{name}': needs begin and end tokens (bos/cls and eos/sep); it has "
                          f"begin={sot}, end={eot}")
    if sot == eot:
        raise ConfigError(f"data.tokenizer '{name}': begin and end tokens share id {sot} (GPT-2 style bos == eos), "
                          "which would empty every caption; use a tokenizer with distinct ones (e.g. BERT's CLS/SEP)")


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str, context_length: int) -> Tokenizer:
    """One tokenizer per (name, length) and process: loader workers decode every caption through it."""
    return Tokenizer(name, context_length)


def tokenize(texts: list, context_length: int, name: str = OPENCLIP) -> torch.Tensor:
    return get_tokenizer(name, context_length).batch(texts)


def decode(ids: list, context_length: int, name: str = OPENCLIP) -> str:
    return get_tokenizer(name, context_length).decode(ids)


def check_model_fits(name: str, model_cfg) -> None:
    """The model's vocab and special ids must match the tokenizer the data uses (ConfigError naming fields)."""
    tok = get_tokenizer(name, model_cfg.context_length)
    ids = (("sot_id", tok.sot_id), ("eot_id", tok.eot_id))
    problems = [f"model.{field}={getattr(model_cfg, field)} but tokenizer has {value}"
                for field, value in ids if getattr(model_cfg, field) != value]
    if model_cfg.vocab_size < tok.vocab_size:
        problems.append(f"model.vocab_size={model_cfg.vocab_size} < tokenizer vocab {tok.vocab_size}")
    if problems:
        raise ConfigError(f"data.tokenizer '{name}': " + "; ".join(problems))
