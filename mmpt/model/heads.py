"""Heads on top of the trunk: attentional pooling -> projection -> unit embedding, and the CoCa decoder."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.data.tokenizer import valid_mask
from mmpt.model.trunk import MLP, Attention, Block


class EmbeddingHead(nn.Module):
    """CoCa-style attentional pooling (one learned query over the valid tokens), then a linear projection."""

    def __init__(self, width: int, heads: int, embed_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.ln_in, self.pool = nn.LayerNorm(width), Attention(width, heads)
        self.ln_out, self.proj = nn.LayerNorm(width), nn.Linear(width, embed_dim, bias=False)

    def forward(self, hidden: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.query.expand(hidden.size(0), -1, -1)
        pooled = self.pool(q, context=self.ln_in(hidden), key_mask=key_mask)[:, 0]
        return F.normalize(self.proj(self.ln_out(pooled)), dim=-1)


class CaptionDecoder(nn.Module):
    """CoCa decoder: causal text layers, then layers that also cross-attend to the captioned modality's
    encoder tokens; the LM head is tied to the token embedding."""

    def __init__(self, cfg):
        super().__init__()
        w, h = cfg.width, cfg.heads
        self.sot_id, self.eot_id, self.context_length = cfg.sot_id, cfg.eot_id, cfg.context_length
        self.token = nn.Embedding(cfg.vocab_size, w)
        self.pos = nn.Parameter(torch.randn(1, cfg.context_length, w) * 0.01)
        hidden = int(w * cfg.mlp_ratio)
        self.text_layers = nn.ModuleList(Block(w, h, MLP(w, hidden, cfg.dropout), dropout=cfg.dropout)
                                         for _ in range(cfg.decoder_layers))
        self.cross_layers = nn.ModuleList(Block(w, h, MLP(w, hidden, cfg.dropout), cross=True, dropout=cfg.dropout)
                                          for _ in range(cfg.decoder_cross_layers))
        self.ln = nn.LayerNorm(w)
        nn.init.normal_(self.token.weight, std=0.02)

    def hidden(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.pos[:, : tokens.size(1)]
        for layer in self.text_layers:
            x, _ = layer(x, causal=True)
        for layer in self.cross_layers:
            x, _ = layer(x, causal=True, context=context, context_mask=context_mask)
        return self.ln(x)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> dict:
        """Teacher forcing. Logits only for real target positions (up to EOT): the vocab projection is the
        costliest op here and padding would waste it."""
        h = self.hidden(tokens[:, :-1], context, context_mask)
        target_mask = valid_mask(tokens, self.eot_id)[:, 1:]
        logits = h[target_mask] @ self.token.weight.t()
        return {"caption_logits": logits, "caption_targets": tokens[:, 1:][target_mask]}

    @torch.no_grad()
    def generate(self, context: torch.Tensor, context_mask: torch.Tensor, max_len: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding; returns (B, L) ids starting with SOT, padded with 0 after EOT."""
        max_len = max_len or self.context_length
        b = context.size(0)
        out = torch.full((b, 1), self.sot_id, dtype=torch.long, device=context.device)
        done = torch.zeros(b, dtype=torch.bool, device=context.device)
        for _ in range(max_len - 1):
            logits = self.hidden(out, context, context_mask)[:, -1] @ self.token.weight.t()
            nxt = torch.where(done, torch.zeros_like(done, dtype=torch.long), logits.argmax(-1))
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == self.eot_id
            if done.all():
                break
        return out
