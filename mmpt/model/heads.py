"""Heads on top of the trunk: attentional pooling -> projection -> unit embedding, and the CoCa decoder."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.model.stems import valid_mask
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


# The decoder's token table is stored at 1/TOKEN_SCALE and used at TOKEN_SCALE x: the same function at init
# (std 0.02), but Adam moves every weight about lr a step whatever its gradient's size, so the table learns
# TOKEN_SCALE x faster, and its small gradients (rows of tokens the captions never use) stay clear of Adam's eps.
# At lr 3e-4 a logit moved by ~lr * |h|_1 ~ 0.03 a step: pushing 8.5k unused tokens' logits down took the
# demo's whole budget, and the decoder never got to the image (caption loss ~1.6 at step 500, every image
# "a handwritten digit one"). Measured on the demo (500 steps, seed 0): image-text caption loss 1.62 -> 0.36,
# held-out captions naming their image's digit 21/297 -> 266/297, image zero-shot 0.875 -> 0.919.
TOKEN_SCALE = 10.0


def _token_scale_of_old_checkpoints(module, state_dict, prefix, *args) -> None:
    """Checkpoints from before TOKEN_SCALE hold the table as used (scale 1)."""
    if f"{prefix}token.weight" in state_dict and f"{prefix}token_scale" not in state_dict:
        state_dict[f"{prefix}token_scale"] = torch.ones(1)


class CaptionDecoder(nn.Module):
    """CoCa decoder: causal text layers, then layers that also cross-attend to the captioned modality's
    encoder tokens; the LM head is tied to the token embedding."""

    token_scale: torch.Tensor

    def __init__(self, cfg):
        super().__init__()
        w, h = cfg.width, cfg.heads
        self.sot_id, self.eot_id, self.context_length = cfg.sot_id, cfg.eot_id, cfg.context_length
        self.token = nn.Embedding(cfg.vocab_size, w)
        # Shape (1,), not a scalar: DeepSpeed's broadcast cannot view 0-dim tensors as bytes. A buffer, so a
        # checkpoint carries the scale its table was trained at; used in the table's dtype, since a float32
        # buffer beside bf16 weights (DeepSpeed leaves buffers as they are) would promote the activations.
        self.register_buffer("token_scale", torch.full((1,), TOKEN_SCALE))
        self.pos = nn.Parameter(torch.randn(1, cfg.context_length, w) * 0.01)
        hidden = int(w * cfg.mlp_ratio)
        self.text_layers = nn.ModuleList(Block(w, h, MLP(w, hidden, cfg.dropout), dropout=cfg.dropout)
                                         for _ in range(cfg.decoder_layers))
        self.cross_layers = nn.ModuleList(Block(w, h, MLP(w, hidden, cfg.dropout), cross=True, dropout=cfg.dropout)
                                          for _ in range(cfg.decoder_cross_layers))
        self.ln = nn.LayerNorm(w)
        nn.init.normal_(self.token.weight, std=0.02 / TOKEN_SCALE)
        self.register_load_state_dict_pre_hook(_token_scale_of_old_checkpoints)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token + position embeddings of `tokens`, the first at position `start`."""
        x = self.token(tokens)
        return x * self.token_scale.to(x.dtype) + self.pos[:, start: start + tokens.size(1)]

    def lm_weight(self) -> torch.Tensor:
        """(D, V): the LM head, tied to the token table as the embedding uses it."""
        w = self.token.weight
        return (w * self.token_scale.to(w.dtype)).t()

    def hidden(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.text_layers:
            x, _ = layer(x, causal=True)
        for layer in self.cross_layers:
            x, _ = layer(x, causal=True, context=context, context_mask=context_mask)
        return self.ln(x)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> dict:
        """Teacher forcing: the hidden states of the real target positions (up to EOT; the vocab projection is the
        costliest op here and padding would waste it) with the tied LM head's table and scale. The loss projects
        them (mmpt.losses.caption_loss: hidden @ (table * scale).T, as `logits`), so that projection and softmax
        can run as one compiled pass."""
        h = self.hidden(tokens[:, :-1], context, context_mask)
        target_mask = valid_mask(tokens, self.eot_id)[:, 1:]
        return {"caption_hidden": h[target_mask], "caption_table": self.token.weight,
                "caption_scale": self.token_scale, "caption_targets": tokens[:, 1:][target_mask]}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., V) logits through the tied LM head."""
        return hidden @ self.lm_weight()

    def target_count(self, tokens: torch.Tensor) -> int:
        """How many positions `forward` would score (what weights micro-batches' caption losses)."""
        return int(valid_mask(tokens, self.eot_id)[:, 1:].sum())

    def _next_logprobs(self, seq: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(seq, context, context_mask)[:, -1]).float().log_softmax(-1)

    def _start_cache(self, context: torch.Tensor) -> list:
        """One dict per layer (text layers, then cross layers): self-attention keys/values are appended step by
        step; the cross layers' keys/values of the encoder context are projected here, once."""
        caches: list = [{} for _ in self.text_layers]
        for layer in self.cross_layers:
            k, v = layer.cross.keys_values(context)
            caches.append({"context_k": k, "context_v": v})
        return caches

    def _cached_logprobs(self, seq: torch.Tensor, caches: list, context_mask: torch.Tensor) -> torch.Tensor:
        """`_next_logprobs` from the newest token alone: the earlier tokens' keys/values are in `caches`."""
        t = seq.size(1) - 1
        x = self.embed(seq[:, t:], t)
        for layer, cache in zip([*self.text_layers, *self.cross_layers], caches, strict=True):
            x = layer.step(x, cache, context_mask)
        return self.logits(self.ln(x)[:, -1]).float().log_softmax(-1)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, context_mask: torch.Tensor, max_len: Optional[int] = None,
                 num_beams: int = 1, length_penalty: float = 1.0, use_cache: bool = True) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search; (B, <=max_len) ids starting with SOT, 0-padded after EOT.
        Beams are ranked by log-probability / length**length_penalty. With `use_cache` (KV cache) each step
        feeds only the newest token; without, every step re-runs the whole prefix (same ids, kept as the
        reference the cache is tested against)."""
        max_len = max_len or self.context_length
        if not 1 <= max_len <= self.context_length:
            raise ValueError(f"max_len={max_len}: must be in 1..{self.context_length} (the decoder's positions)")
        b, dev = context.size(0), context.device
        k = num_beams
        ctx, ctx_mask = context.repeat_interleave(k, 0), context_mask.repeat_interleave(k, 0)
        caches = self._start_cache(ctx) if use_cache else None
        seq = torch.full((b * k, 1), self.sot_id, dtype=torch.long, device=dev)
        score = torch.zeros(b, k, device=dev)
        score[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        for _ in range(max_len - 1):
            if caches is None:
                logp = self._next_logprobs(seq, ctx, ctx_mask)  # (B*k, V)
            else:
                logp = self._cached_logprobs(seq, caches, ctx_mask)
            logp[done] = float("-inf")
            logp[done, 0] = 0.0  # finished beams only extend with padding, at no cost
            total = (score.view(-1, 1) + logp).view(b, -1)  # (B, k*V)
            score, flat = total.topk(k, dim=-1)
            beam, token = flat // logp.size(1), flat % logp.size(1)
            rows = (beam + torch.arange(b, device=dev)[:, None] * k).view(-1)
            seq = torch.cat([seq[rows], token.view(-1, 1)], dim=1)
            done = done[rows] | (token.view(-1) == self.eot_id)
            if caches is not None and k > 1:
                # The cache follows its beams. Rows never leave their sample, whose beams share one context:
                # the context keys/values need no reordering.
                for cache in caches:
                    cache["k"], cache["v"] = cache["k"][rows], cache["v"][rows]
            if done.all():
                break
        lengths = valid_mask(seq, self.eot_id).sum(1).float().view(b, k)
        best = (score / lengths.pow(length_penalty)).argmax(-1)
        return seq.view(b, k, -1)[torch.arange(b, device=dev), best]
