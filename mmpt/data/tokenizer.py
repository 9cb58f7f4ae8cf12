"""Text tokenizer: open_clip's BPE (its vocab ships in the wheel, so it works offline)."""
from __future__ import annotations

import functools

import torch

PAD_ID = 0  # open_clip pads with id 0; the real end of a caption is the EOT token


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """(N, L) int64 token ids, SOT ... EOT then padding; long captions are truncated with EOT kept."""
    return get_tokenizer(context_length)(texts)


def eot_id(context_length: int) -> int:
    return get_tokenizer(context_length).eot_token_id


def valid_mask(tokens: torch.Tensor, eot: int) -> torch.Tensor:
    """True up to and including the first EOT of each row (id 0 is a real BPE token, so no `!= 0`)."""
    is_eot = tokens == eot
    has_eot = is_eot.any(dim=1, keepdim=True)
    first = torch.where(has_eot, is_eot.int().argmax(dim=1, keepdim=True), tokens.new_full((tokens.size(0), 1), tokens.size(1) - 1))
    pos = torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0)
    return pos <= first


def decode(ids: list[int], context_length: int) -> str:
    tok = get_tokenizer(context_length)
    eot = tok.eot_token_id
    ids = [i for i in ids if i != tok.sot_token_id]
    if eot in ids:
        ids = ids[: ids.index(eot)]
    return tok.decode(ids).strip()
