"""Text tokenizers: open_clip's BPE by default (its vocab ships in the wheel, so it works offline), or a
HuggingFace tokenizer loaded from a local directory (`data.tokenizer: /path/to/tokenizer`)."""
from __future__ import annotations

import functools
import os

import torch

from mmpt.config import ConfigError


@functools.lru_cache(maxsize=4)
def _openclip(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class Tokenizer:
    """`encode(text) -> (L,) int64`: SOT ... EOT then padding (0), truncated with EOT kept."""

    def __init__(self, name: str = "openclip", context_length: int = 16):
        self.name, self.context_length = name, context_length
        if name == "openclip":
            tok = _openclip(context_length)
            self.sot_id, self.eot_id, self.vocab_size = tok.sot_token_id, tok.eot_token_id, tok.vocab_size
            self._hf = None
        else:
            if not os.path.isdir(name):
                raise FileNotFoundError(f"tokenizer '{name}': not 'openclip' and not a local tokenizer directory")
            self._hf = _load_hf(name)
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


def tokenize(texts: list, context_length: int, name: str = "openclip") -> torch.Tensor:
    return get_tokenizer(name, context_length).batch(texts)


def decode(ids: list, context_length: int) -> str:
    tok = _openclip(context_length)
    ids = [i for i in ids if i != tok.sot_token_id]
    if tok.eot_token_id in ids:
        ids = ids[: ids.index(tok.eot_token_id)]
    return tok.decode(ids).strip()


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
