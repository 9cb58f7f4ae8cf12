"""Composition of stems, trunk and heads into one model returning a dict (see mmpt/model/__init__.py)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpt import modality as registry
from mmpt.model.heads import CaptionDecoder, EmbeddingHead
from mmpt.model.moe import make_ffn
from mmpt.model.trunk import Trunk


def build_stems(cfg) -> nn.ModuleDict:
    """One stem per modality the config names, from the registry (a modality may borrow another's stem)."""
    plan = registry.stem_plan(cfg)
    return nn.ModuleDict({m: registry.get(m).stem(cfg) for m in cfg.modalities if plan[m][0] == m})


def build_trunk(cfg) -> Trunk:
    return Trunk(cfg.width, cfg.depth, cfg.heads, lambda i: make_ffn(cfg, i), cfg.dropout, cfg.grad_checkpointing)


class Centres(nn.Module):
    """Per modality, a running mean of the training batches' mean unit embedding (`loss.centre_embeddings`,
    mmpt.losses.centre): evaluation subtracts it where training subtracted the batch's own mean. All zeros (a
    run trained without centring, or a checkpoint from before it): embeddings are left as they are."""

    MOMENTUM = 0.9  # a modality's centre follows its last ~10 batches: the embeddings drift as they train

    def __init__(self, modalities: list, dim: int):
        super().__init__()
        for m in modalities:
            self.register_buffer(m, torch.zeros(dim))

    def subtract(self, modality: str, emb: torch.Tensor) -> torch.Tensor:
        centre = getattr(self, modality)
        if not bool(centre.any()):
            return emb
        return F.normalize(emb - centre.to(emb.dtype), dim=-1)

    @torch.no_grad()
    def update(self, modality: str, mean: torch.Tensor) -> None:
        centre = getattr(self, modality)
        if bool(centre.any()):
            centre.lerp_(mean.to(centre.dtype), 1 - self.MOMENTUM)
        else:
            centre.copy_(mean)


class MultimodalModel(nn.Module):
    def __init__(self, cfg, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 init_logit_bias: Optional[float] = None):
        super().__init__()
        self.cfg = cfg
        self.max_log_scale = math.log(max_logit_scale)
        self.plan = registry.stem_plan(cfg)
        self.stems = build_stems(cfg)
        # A modality that borrows another's stem (image_as_video) borrows its whole encoder path: modality
        # embedding and pooling head too, so what image-text teaches is the video encoder (IMP).
        own = [m for m in cfg.modalities if self.plan[m][0] == m]
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, cfg.width)) for m in own})
        self.trunk = build_trunk(cfg)
        # model.own_trunk: separate towers (open_clip's text tower) where asked; modality is data here too
        self.own_trunks = nn.ModuleDict({m: build_trunk(cfg) for m in cfg.own_trunk})
        self.heads = nn.ModuleDict({m: EmbeddingHead(cfg.width, cfg.heads, cfg.embed_dim) for m in own})
        self.centres = Centres(list(cfg.modalities), cfg.embed_dim)  # per modality: image and video share a head
        pairs = [registry.pair_name(a, b) for a, b in registry.pairs(cfg.modalities)]
        # One learnable temperature per modality pair (log scale, clamped in forward). Shape (1,), not a
        # scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes.
        self.log_scales = nn.ParameterDict({p: nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
                                            for p in pairs})
        # Sigmoid (SigLIP) losses also learn a logit bias per pair.
        self.logit_biases = None if init_logit_bias is None else nn.ParameterDict(
            {p: nn.Parameter(torch.full((1,), float(init_logit_bias))) for p in pairs})
        with_text = registry.TEXT in cfg.modalities and cfg.decoder_cross_layers > 0
        self.decoder = CaptionDecoder(cfg) if with_text else None
        self.register_load_state_dict_pre_hook(_rename_old_pair_keys)

    def encode(self, modality: str, x: torch.Tensor, drop_token: Optional[float] = None) -> dict:
        """drop_token: this call's DropToken rate (a task's, data.tasks); None: the stem's own."""
        stem, repeat = self.plan[modality]
        entry = registry.get(modality)
        x = entry.to_float(x, next(self.stems[stem].parameters()).dtype)  # uint8 media normalised here, on device
        volume = entry.stem_input(x, repeat)
        # A plugin's stem may not take a rate; it is only passed when a task sets one.
        tokens, mask = self.stems[stem](volume) if drop_token is None else self.stems[stem](volume, drop_token)
        trunk = self.own_trunks[stem] if stem in self.own_trunks else self.trunk
        trunk = trunk(tokens + self.modality[stem], mask)
        emb = self.heads[stem](trunk["hidden"], mask)
        if not self.training:  # training centres on the batch, in the loss
            emb = self.centres.subtract(modality, emb)
        return {"emb": emb, "hidden": trunk["hidden"], "mask": mask, "aux": trunk["aux"]}

    def logit_scale(self, pair: str) -> torch.Tensor:
        return self.log_scales[pair].clamp(max=self.max_log_scale).exp()[0]

    def forward(self, batch: dict, caption_source: Optional[str] = None, caption: bool = True,
                drop_token: Optional[dict] = None) -> dict:
        """caption=False skips the decoder and reports only how many caption tokens it would score.
        drop_token: DropToken rates by modality for this call (a task's), over the model's own."""
        present = [m for m in self.cfg.modalities if m in batch]
        enc = {m: self.encode(m, batch[m], (drop_token or {}).get(m)) for m in present}
        pairs = [registry.pair_name(a, b) for a, b in registry.pairs(present)]
        out = {"emb": {m: e["emb"] for m, e in enc.items()},
               "aux": {f"{m}.{k}": v for m, e in enc.items() for k, v in e["aux"].items()},
               "logit_scale": {p: self.logit_scale(p) for p in pairs},
               "tokens": {m: e["mask"].sum().detach() for m, e in enc.items()}}  # encoder tokens run (throughput)
        if self.logit_biases is not None:
            out["logit_bias"] = {p: self.logit_biases[p][0] for p in pairs}
        if caption_source is None:  # caption whatever modality is paired with the text
            others = [m for m in present if m != registry.TEXT]
            caption_source = others[0] if len(others) == 1 else None
        if self.decoder is not None and caption_source in enc and registry.TEXT in batch:
            src, text = enc[caption_source], batch[registry.TEXT]
            if caption:
                out.update(self.decoder(text, src["hidden"], src["mask"]))
            else:
                out["caption_tokens"] = self.decoder.target_count(text)
        return out

    @torch.no_grad()
    def caption(self, modality: str, x: torch.Tensor, max_len: Optional[int] = None,
                num_beams: int = 1) -> torch.Tensor:
        src = self.encode(modality, x)
        return self.decoder.generate(src["hidden"], src["mask"], max_len, num_beams)


def _rename_old_pair_keys(module, state_dict, prefix, *args) -> None:
    """Checkpoints from before the one pair spelling named pair parameters `a_b` (alphabetical): rename them.
    Checkpoints from before `loss.centre_embeddings` have no centres: zeros, which leave embeddings as they are."""
    for m in module.cfg.modalities:
        state_dict.setdefault(f"{prefix}centres.{m}", torch.zeros(module.cfg.embed_dim))
    for group in ("log_scales", "logit_biases"):
        start = f"{prefix}{group}."
        for key in [k for k in state_dict if k.startswith(start) and "_" in k[len(start):]]:
            names = key[len(start):].split("_")
            if len(names) == 2 and all(n in registry.MODALITIES for n in names):  # else: the strict load names it
                state_dict[start + registry.pair_name(*names)] = state_dict.pop(key)


def build_model(cfg, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                init_logit_bias: Optional[float] = None) -> MultimodalModel:
    return MultimodalModel(cfg, init_temperature, max_logit_scale, init_logit_bias)


def build_for_run(cfg) -> MultimodalModel:
    """The model of a whole run Config: the loss section decides the temperature init and the bias."""
    bias = cfg.loss.init_logit_bias if cfg.loss.contrastive_kind == "sigmoid" else None
    return build_model(cfg.model, cfg.loss.init_temperature, cfg.loss.max_logit_scale, bias)
