"""The shared Transformer trunk: pre-norm blocks over any modality's tokens, with padding masks.

The FFN of each block is built by `make_ffn(layer_index)`, the slot where Mixture-of-Experts layers go.
Blocks return auxiliary outputs (e.g. MoE losses) in a dict that the trunk merges.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def attention_mask(key_mask: Optional[torch.Tensor], n_query: int, causal: bool,
                   device: torch.device) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend) broadcastable to (B, heads, Nq, Nk), or None for full attention."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if causal:
        n_key = n_query if key_mask is None else key_mask.size(1)
        tri = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril()
        mask = tri if mask is None else mask & tri
    return mask


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.size(1), 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = attention_mask(key_mask, n, causal, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))

    # Incremental decoding (the caption decoder's KV cache) splits `forward` in two, so that keys and values
    # are projected once per token (or once per context) and reused at every later step.
    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> keys and values, each (B, heads, N, D / heads), exactly as `forward` computes them."""
        b, n, _ = context.shape
        k, v = self.kv(context).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queries from x (B, n, D) attend to given keys/values; no causal mask: a cache holds only the past."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """Dense FFN. Returns a tensor (DeepSpeed calls experts as `expert(x)`); MoE layers return (y, aux)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, FFN (dense or MoE)."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module, cross: bool = False, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.ln_cross = nn.LayerNorm(dim) if cross else None
        self.cross = Attention(dim, heads, dropout) if cross else None
        self.ln2, self.ffn = nn.LayerNorm(dim), ffn

    def forward(self, x, key_mask=None, causal=False, context=None, context_mask=None):
        x = x + self.attn(self.ln1(x), key_mask=key_mask, causal=causal)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), context=context, key_mask=context_mask)
        out = self.ffn(self.ln2(x), key_mask)
        y, aux = out if isinstance(out, tuple) else (out, {})
        return x + y, aux

    def step(self, x: torch.Tensor, cache: dict, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`forward(x, causal=True, ...)` for the newest position only, x (B, 1, D). `cache` holds this block's
        self-attention keys/values of the earlier positions ("k", "v"; appended here) and, for a cross block,
        its context's ("context_k", "context_v", from `cross.keys_values` once per generation). Attending to
        the cached past plus itself is the causal mask's row for this position."""
        h = self.ln1(x)
        k, v = self.attn.keys_values(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        x = x + self.attn.attend(h, k, v)
        if self.cross is not None:
            x = x + self.cross.attend(self.ln_cross(x), cache["context_k"], cache["context_v"], context_mask)
        out = self.ffn(self.ln2(x), None)
        return x + (out[0] if isinstance(out, tuple) else out)


class Trunk(nn.Module):
    """One Transformer shared by every modality; modality identity comes from the stems' embeddings."""

    def __init__(self, width: int, depth: int, heads: int, make_ffn: Callable[[int], nn.Module],
                 dropout: float = 0.0, grad_checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, make_ffn(i), dropout=dropout) for i in range(depth))
        self.ln = nn.LayerNorm(width)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> dict:
        aux_all: dict = {}
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x, aux = checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x, aux = block(x, key_mask)
            aux_all.update({f"layer{i}.{k}": v for k, v in aux.items()})
        return {"hidden": self.ln(x), "aux": aux_all}
