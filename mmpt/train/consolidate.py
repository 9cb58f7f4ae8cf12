"""A checkpoint read back as one full fp32 state dict, on CPU and without a process group, from any ZeRO stage and
either MoE backend, in the native backend's layout (what `mmpt export` and `eval --model RUN` load).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from mmpt.train.checkpoint import latest_tag


def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """Full fp32 state dict of the wrapped model from any ZeRO stage and either MoE backend, on CPU, without a
    process group, in the native backend's layout: a model built with `model.moe.backend=native` loads it
    strictly, whichever backend trained the run."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found (no 'latest' file or tag directory)")
    step_dir = ckpt_dir / tag
    if (step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():  # ZeRO-3: parameters partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{step_dir}: not a readable ZeRO-3 checkpoint ({_first_line(e)})") from None
    else:
        state = _zero012_state_dict(step_dir)
    prefix = "model."  # TrainModule wraps the model
    return native_moe_layout({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


# ---- ZeRO 0-2 --------------------------------------------------------------------------------------------
# zero_to_fp32 can't read DeepSpeed-MoE checkpoints: it takes the per-expert files for model-state files, and
# it concatenates every optimizer group over all ranks, while expert groups are partitioned over the expert
# data-parallel group only and each expert-parallel rank holds other experts under the same local names.

EXPERT_KEY = re.compile(r"(?P<layer>.+)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<expert>\d+)\."
                        r"(?P<param>fc[12]\.(?:weight|bias))")
ROUTER_SUFFIX = ".moe.deepspeed_moe.gate.wg.weight"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load(path: Path, mmap: bool = False) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: torch's own errors span many lines and types
        raise ValueError(f"{path}: not a readable checkpoint file ({_first_line(e)})") from None


def _shard_rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _zero012_state_dict(step_dir: Path) -> dict:
    """The saved module weights (non-expert ones in mp_rank_00, DeepSpeed-MoE experts in
    layer_L_expert_E_mp_rank_00_model_states.pt under their global expert index), replaced by the optimizer's
    fp32 master weights where ZeRO 1/2 shards hold them (bf16/fp16 runs save 16-bit module weights)."""
    model_file = step_dir / "mp_rank_00_model_states.pt"
    model_states = _load(model_file)
    if "module" not in model_states or "param_shapes" not in model_states:
        raise ValueError(f"{model_file}: not a DeepSpeed model-states file (no 'module' or 'param_shapes')")
    saved = dict(model_states["module"])
    for path in sorted(step_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        saved.update(_load(path))
    # bf16 runs name them bf16_zero_pp_rank_R_...
    shard_files = sorted(step_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_shard_rank)
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved.items()}
    if not shard_files:  # ZeRO-0: the module weights are the weights
        return state
    shards = [_load(path, mmap=True).get("optimizer_state_dict", {}) for path in shard_files]
    if any("single_partition_of_fp32_groups" not in s for s in shards):
        raise ValueError(f"{step_dir}: optimizer shards without fp32 partitions (not a ZeRO 1/2 checkpoint)")
    for name, master in _zero12_masters(model_states["param_shapes"], shards).items():
        if name not in saved or not torch.equal(master.to(saved[name].dtype), saved[name]):
            # A layout this reader gets wrong must fail loudly, not hand back shuffled weights.
            raise ValueError(f"{step_dir}: fp32 master weights of {name} do not match the saved module weights")
        state[name] = master
    return state


def _zero12_masters(param_shapes: list, shards: list) -> dict:
    """Unflatten ZeRO 1/2 fp32 partitions. A group partitioned over N / ep ranks (the expert data-parallel
    group) holds different experts on each of the ep expert-parallel ranks; DeepSpeed's default E + D layout
    puts expert-parallel rank i's group on ranks i, i + ep, i + 2 ep, ... and its experts at global indices
    i * local + 0 .. local - 1."""
    world, state = len(shards), {}
    counts = shards[0]["partition_count"]
    paddings = shards[0].get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        count = counts[g] if isinstance(counts, list) else counts
        if world % count:
            raise ValueError(f"optimizer group {g} is partitioned over {count} ranks, not a divisor of {world}")
        ep = world // count
        local = _local_experts(shapes) if ep > 1 else 0
        for ep_rank in range(ep):
            flat = torch.cat([shards[r]["single_partition_of_fp32_groups"][g] for r in range(ep_rank, world, ep)])
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                if offset + numel > flat.numel():
                    raise ValueError(f"optimizer group {g} holds {flat.numel()} values, too few for {name}")
                key = _global_expert(name, ep_rank * local) if ep > 1 else name
                state[key] = flat.narrow(0, offset, numel).view(tuple(shape)).detach().clone()
                offset += numel + (paddings[g][i] if paddings else 0)
    return state


def _local_experts(shapes: dict) -> int:
    ids = [int(m["expert"]) for name in shapes if (m := EXPERT_KEY.fullmatch(name))]
    if not ids:
        raise ValueError(f"an expert-parallel optimizer group holds no expert parameters ({next(iter(shapes))})")
    return max(ids) + 1


def _global_expert(name: str, offset: int) -> str:
    m = EXPERT_KEY.fullmatch(name)
    if m is None:
        raise ValueError(f"{name}: a non-expert parameter in an expert-parallel optimizer group")
    return f"{m['layer']}.moe.deepspeed_moe.experts.deepspeed_experts.{int(m['expert']) + offset}.{m['param']}"


# ---- DeepSpeed-MoE keys -> NativeMoE's ---------------------------------------------------------------------

def native_moe_layout(state: dict) -> dict:
    """DeepSpeed MoE layers' keys -> NativeMoE's, the inverse of mmpt.model.moe.copy_native_to_deepspeed: the gate
    becomes router.weight, expert e's fc1/fc2 (nn.Linear, (out, in)) become w1[e] (D, H), b1[e], w2[e] (H, D),
    b2[e]. Other keys pass through unchanged."""
    out, experts = {}, {}
    for key, value in state.items():
        if (m := EXPERT_KEY.fullmatch(key)) is not None:
            experts.setdefault(m["layer"], {})[int(m["expert"]), m["param"]] = value
        elif key.endswith(ROUTER_SUFFIX):
            out[key[: -len(ROUTER_SUFFIX)] + ".router.weight"] = value
        else:
            out[key] = value
    for layer, params in experts.items():
        n = 1 + max(e for e, _ in params)
        missing = [f"{e}.{p}" for e in range(n) for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
                   if (e, p) not in params]
        if missing:
            raise ValueError(f"{layer}: experts missing from the checkpoint ({', '.join(missing[:4])})")
        for native, param, transpose in (("w1", "fc1.weight", True), ("b1", "fc1.bias", False),
                                         ("w2", "fc2.weight", True), ("b2", "fc2.bias", False)):
            out[f"{layer}.{native}"] = torch.stack([params[e, param].t() if transpose else params[e, param]
                                                    for e in range(n)]).contiguous()
    return out
