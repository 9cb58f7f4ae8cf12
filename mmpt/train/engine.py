"""DeepSpeed engine: the DeepSpeed JSON built from the typed config, optimizer, schedule.

The DeepSpeed config is generated, not hand-written, so batch sizes and ZeRO stage can't disagree with
the run config; `deepspeed.extra` in the YAML is merged last for anything else DeepSpeed offers.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mmpt.data.stream import tasks_from_config
from mmpt.losses.accumulate import surrogate
from mmpt.losses.captioning import compiled_caption_loss
from mmpt.losses.centre import batch_mean
from mmpt.losses.objective import PAIR_PARAMS, objective
from mmpt.model.moe import NativeMoE
from mmpt.model.trunk import Block


class TrainModule(nn.Module):
    """What the DeepSpeed engine wraps: batch dict in, loss dict out. The two keyword modes serve
    accumulated steps (`mmpt.train.accumulate`): encode_only returns embeddings without the decoder, cached
    returns the micro-batch's surrogate loss for the cached gradients (`mmpt.losses.accumulate.surrogate`)."""

    def __init__(self, model: nn.Module, loss_cfg, group=None):
        super().__init__()
        self.model, self.loss_cfg, self.group = model, loss_cfg, group
        self.compiled_loss = False  # train.compile (compile_engine)

    def forward(self, batch: dict, encode_only: bool = False, cached: dict | None = None,
                drop_token: dict | None = None) -> dict:
        """drop_token: the task's DropToken rates by modality (data.tasks), over the model's own."""
        if encode_only:
            out = self.model(batch, caption=False, drop_token=drop_token)
            self._track_centres(out["emb"])
            keep = ("emb", *PAIR_PARAMS)
            return {**{k: out[k] for k in keep if k in out}, "caption_tokens": out.get("caption_tokens", 0)}
        out = self.model(batch, drop_token=drop_token)
        if cached is None:  # an accumulated step tracked its micro-batch in the encode_only pass
            self._track_centres(out["emb"])
        with compiled_caption_loss(self.compiled_loss):
            losses = surrogate(out, cached, self.loss_cfg) if cached is not None else objective(out, self.loss_cfg,
                                                                                                 self.group)
        return {**losses, **{f"tokens/{m}": n.float() for m, n in out["tokens"].items()}}

    def _track_centres(self, emb: dict) -> None:
        """The model's running centres (what evaluation subtracts) follow the batch means over every rank, so
        that every rank keeps the same buffers."""
        if self.loss_cfg.centre_embeddings and self.training:
            for m, e in emb.items():
                self.model.centres.update(m, batch_mean(e.detach(), grad=False))


def clear_grad_partitions(engine) -> None:
    """After an optimizer step (engine.step() at the accumulation boundary). ZeRO-3 (DeepSpeed 0.19) keeps each
    parameter's reduced gradient in a persistent flat buffer, overwritten only for parameters that receive one,
    and steps on the whole buffer: a parameter without a gradient this step (another task's stem or head, an
    expert no token reached) would be stepped again with its last gradient, which also enters the clipping
    norm. A fresh engine starts from zeros, so resumed runs differed from straight ones. Zero it, and the
    persistent fp32 gradient partitions of optimizer offload, which behave the same way."""
    opt = getattr(engine, "optimizer", None)
    buffer = getattr(opt, "grad_partitions_flat_buffer", None)
    if buffer is None:  # ZeRO 0-2: gradients of unused parameters are zeros already
        return
    buffer.zero_()
    if getattr(opt, "offload_optimizer", False):
        for flat in opt.fp32_partitioned_groups_flat:
            if flat.grad is not None:
                flat.grad.zero_()


def half_dtype(engine) -> torch.dtype | None:
    """The half-precision dtype the engine computes in (bf16 or fp16 mode), None in fp32."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None


def to_engine(batch: dict, engine) -> dict:
    """A loader batch (CPU) -> the engine's device; float media in the dtype the engine computes in
    (DeepSpeed's bf16/fp16 modes cast the module itself, not its inputs). Token ids stay integers."""
    half = half_dtype(engine)
    return {k: v.to(engine.device, dtype=half if v.is_floating_point() else None, non_blocking=True)
            for k, v in batch.items()}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


def largest_task_batch(cfg) -> int:
    """The largest batch per rank of the run's tasks (data.tasks.<pair>.batch_size, else data.batch_size)."""
    tasks, _ = tasks_from_config(cfg, expand=False)
    return max((task.batch_size for task in tasks.values()), default=cfg.data.batch_size)


def deepspeed_config(cfg, world_size: int, load_universal: bool = False, num_params: int | None = None) -> dict:
    """num_params: the model's; ZeRO 1-2 buckets are capped at it (DeepSpeed's default, 5e8 elements, is a
    2 GB fp32 buffer per step for a 15M-parameter model). `deepspeed.extra` overrides anything here.
    The batch fields: DeepSpeed never splits or builds a batch here (each task's loader hands the engine its
    own); it only checks train_batch_size = micro x accumulation x world and sizes its throughput timer's
    samples/s (not printed: steps_per_print) with the micro-batch. Tasks' batches differ (data.tasks), so one
    value stands for them: the largest task's, the batch device memory has to hold."""
    micro = largest_task_batch(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.accumulate,
        "train_batch_size": micro * world_size * cfg.train.accumulate,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    if num_params and cfg.deepspeed.zero_stage in (1, 2):
        bucket = int(min(500_000_000, max(1_000_000, num_params))) // 512 * 512  # DeepSpeed: multiples of its alignment
        ds["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if load_universal:  # resuming on another world size (mmpt.train.reshard)
        ds["checkpoint"] = {"load_universal": True}
    return _merge(ds, cfg.deepspeed.extra)


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """No weight decay on norms, biases, position/modality embeddings, pooling queries and temperatures."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        skip = (p.ndim < 2 or leaf in ("pos", "pos_time", "pos_space", "query", "b1", "b2")
                or name.startswith(("model.log_scales", "model.logit_biases"))
                or name.startswith("model.modality."))
        (no_decay if skip else decay).append(p)
    # Named: DeepSpeed's MoE group splitter keys groups by name.
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return f


def adamw(groups: list, **hyper) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (CPU since torch 2.4, and CUDA): one pass over each parameter
    tensor instead of a dozen elementwise ops. On 15M parameters (the demo model with open_clip's full BPE),
    2 CPU threads: 9 ms per step instead of 52 (the same updates to ~2e-7 relative). Without a fused kernel
    for these parameters (an older torch, another device), the default implementation."""
    try:
        return torch.optim.AdamW(groups, fused=True, **hyper)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, **hyper)


def compile_engine(engine, cfg) -> None:
    """train.compile: torch.compile, in place, each Transformer block (trunk, own trunks, caption decoder): the
    attention, norms and MLPs, most of a step's work; and the caption loss, its vocabulary projection and softmax
    as one graph (mmpt.losses.captioning.compiled_caption_loss). In place, so parameter names, checkpoints and
    DeepSpeed's hooks stay as they are; AOTAutograd compiles each block's backward.
    - Why blocks, not the whole step: measured on tests/test_recovery.py's TINY run at ZeRO-2 (2 ranks, 3 tasks,
      GradCache, 20 steps): compiling the whole TrainModule warmed up 4x longer, recompiled at every graph break
      (routing, the losses' collectives) and moved losses by 5e-5; adding the stems and heads moved them by 5e-5
      too. Blocks alone stay within 1e-6 of eager.
    - dynamic=False: a block gets one graph per input shape, and a task's shapes are fixed (its batch, its
      modality's token count, DropToken's kept count), so the graphs are bounded by the tasks; the recompile
      limit is raised to hold them all.
    - NativeMoE's routing stays eager (torch.compiler.disable: its per-expert splits depend on the data). Marked
      here, on each layer, not by a decorator in mmpt.model.moe: the decorator imports torch._dynamo, 1.4 s of
      every `mmpt` command's start.
    - ZeRO-3 gathers each layer's parameters in module hooks, which break the graph at every layer; it works and
      matches eager, but recompiles per layer up to the limit and runs slower than eager on CPU.
    - fallback_random: dropout and DropToken draw from torch's generator as in eager, so a compiled run makes the
      same random choices."""
    import torch._dynamo
    import torch._inductor.config

    tasks, _ = tasks_from_config(cfg, expand=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * (len(tasks) + 1))
    torch._inductor.config.fallback_random = True
    compile_blocks(engine.module)
    engine.module.compiled_loss = True


def compile_blocks(module: nn.Module) -> None:
    """In place: each Transformer block of `module` compiled (dynamic=False), each NativeMoE layer's routing
    kept eager (compile_engine says why)."""
    for m in module.modules():
        if isinstance(m, NativeMoE):
            m.forward = torch.compiler.disable(m.forward)
        elif isinstance(m, Block):
            m.compile(dynamic=False)


def build_engine(module: nn.Module, cfg, world_size: int, load_universal: bool = False):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    o = cfg.optim
    groups = param_groups(module, o.weight_decay)
    if any(getattr(p, "allreduce", True) is False for p in module.parameters()):
        # DeepSpeed MoE experts are reduced over the expert-data-parallel group: they need their own groups.
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # A torch optimizer: DeepSpeed's FusedAdam would JIT-compile for minutes on CPU-only machines.
    optimizer = adamw(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size, load_universal,
                                                                  sum(p.numel() for p in module.parameters())))
    if cfg.train.compile:
        compile_engine(engine, cfg)
    return engine
