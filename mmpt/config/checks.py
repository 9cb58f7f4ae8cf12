"""What a config field's type cannot say: ranges, sizes that must divide, modalities and MoE settings that must
agree. `validate(cfg)` runs on every loaded config (`mmpt.config.load_config`, `config_from_dict`) and raises
`ConfigError` naming the key, so `mmpt train` stops with one line before any process group starts. A modality's
own sections are checked by the rules its registry entry brings (`Modality.rules`, `augment_rules`, `positive`).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Optional

from mmpt.config.build import source_augment
from mmpt.config.schema import Config, replaced, task_twins
from mmpt.errors import ConfigError
from mmpt.evals import EVALS
from mmpt.modality import MODALITIES, pair_name, stem_plan

# Sizes, counts and rates; checked first, so no later check (or the model) divides by zero. None (unset) passes.
_POSITIVE = """data.batch_size data.shuffle_slots data.prefetch data.max_consecutive_bad
    model.width model.depth model.heads model.mlp_ratio model.patch_size model.image_size
    model.vocab_size model.embed_dim model.moe.top_k model.moe.ep_size model.moe.capacity_factor
    model.moe.eval_capacity_factor
    loss.init_temperature loss.max_logit_scale loss.contrastive_chunk optim.lr optim.eps train.steps
    train.log_every train.ckpt_every train.accumulate eval.batch_size""".split()
_NON_NEGATIVE = """data.num_workers data.worker_timeout data.shuffle_buffer data.bad_sample_limit model.decoder_layers
    model.decoder_cross_layers model.dropout model.moe.num_experts model.moe.every model.moe.last
    model.moe.balance_weight model.moe.z_loss_weight model.moe.local_entropy_weight model.moe.global_entropy_weight
    model.moe.global_entropy_threshold loss.contrastive_weight loss.caption_weight optim.weight_decay
    optim.warmup_steps optim.grad_clip train.keep_checkpoints eval.workers eval.every train.hub.retries
    train.hub.backoff_s train.hub.final_wait_s""".split()


Rule = tuple[str, object, bool, str]  # (key, value, holds, what it needs)


def _sign_rules(cfg: Config) -> list[Rule]:
    rules = []
    positive_keys = _POSITIVE + [key for m in MODALITIES.values() for key in m.positive]
    for key in positive_keys + _NON_NEGATIVE:
        value: Any = functools.reduce(getattr, key.split("."), cfg)
        positive = key in positive_keys
        holds = value is None or (value > 0 if positive else value >= 0)
        rules.append((key, value, holds, "must be positive" if positive else "must be >= 0"))
    return rules


def _broken(rules: list[Rule]) -> Optional[tuple[str, object, str]]:
    return next(((key, value, need) for key, value, holds, need in rules if not holds), None)


def _value_problem(cfg: Config) -> Optional[tuple[str, object, str]]:
    """The first broken sign or value rule; `_rules` is built only once the signs hold (no division by zero)."""
    return _broken(_sign_rules(cfg)) or _broken(_rules(cfg))


def _rules(cfg: Config) -> list[Rule]:
    """Built after `_sign_rules` hold, so nothing here divides by zero."""
    d, m, o, e = cfg.data, cfg.model, cfg.optim, cfg.eval
    return [r for entry in MODALITIES.values() for r in entry.rules(cfg)] + [
        ("data.bad_sample_limit", d.bad_sample_limit, d.bad_sample_limit <= 1, "must be in [0, 1]"),
        ("model.dropout", m.dropout, m.dropout < 1, "must be in [0, 1)"),
        ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         "needs two values in [0, 1), e.g. [0.9, 0.98]"),
        ("eval.top_k", e.top_k, bool(e.top_k) and min(e.top_k) > 0, "needs one or more positive k"),
        ("model.context_length", m.context_length, m.context_length >= 2, "must be >= 2 (begin and end tokens)"),
        ("model.width", m.width, m.width % m.heads == 0, f"must be divisible by model.heads={m.heads}"),
        ("model.image_size", m.image_size, m.image_size % m.patch_size == 0,
         f"must be divisible by model.patch_size={m.patch_size}"),
        ("loss.contrastive_group_size", cfg.loss.contrastive_group_size, cfg.loss.contrastive_group_size >= -1,
         "must be >= 0, or -1 for the ranks of one node"),
        ("model.patch_size", m.patch_size, m.stem != "conv" or _power_of_two(m.patch_size),
         "must be a power of two >= 2 with model.stem=conv (one stride-2 convolution per halving)"),
        ("train.hub.repo", cfg.train.hub.repo, not cfg.train.hub.repo or bool(REPO_ID.fullmatch(cfg.train.hub.repo)),
         "must be ORG/NAME (or empty: no pushes)"),
        ("train.resume_from", cfg.train.resume_from, _resume_source_ok(cfg.train.resume_from),
         "must be hf-hub:ORG/NAME[@revision] or local-dir:PATH (or empty)"),
    ]


# Model and checkpoint sources (train.resume_from here; mmpt.hub's loaders use the same spellings).
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # ORG/NAME


def _resume_source_ok(source: str) -> bool:
    if source.startswith(HF_HUB):
        return bool(REPO_ID.fullmatch(source[len(HF_HUB):].partition("@")[0]))
    return not source or (source.startswith(LOCAL_DIR) and len(source) > len(LOCAL_DIR))


def _power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def augment_rules(prefix: str, aug: Any) -> list[Rule]:
    """The rules of one resolved augmentation (data.augment, or a source's: data.sources[i].augment)."""
    return [r for m in MODALITIES.values() if m.augment_config is not None
            for r in m.augment_rules(f"{prefix}.{m.name}", getattr(aug, m.name))]


def _augment_rules(cfg: Config) -> list[Rule]:
    rules = augment_rules("data.augment", cfg.data.augment)
    for i, src in enumerate(cfg.data.sources):
        if src.augment is not None:  # resolving names a bad key or type of the override
            rules += augment_rules(f"data.sources[{i}].augment", source_augment(cfg, i))
    return rules


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first key that breaks a rule (types and Literal choices are checked while
    loading)."""
    _raise(_value_problem(cfg) or _broken(_augment_rules(cfg)))
    _validate_modalities(cfg)
    _validate_tasks(cfg)
    _validate_moe(cfg)
    return cfg


def _raise(problem: Optional[tuple[str, object, str]]) -> None:
    if problem is not None:
        key, value, need = problem
        raise ConfigError(f"{key}={value}: {need}")


# data.tasks.<pair> terms stand in for a run-wide key (mmpt.config.schema.task_twins); the task's view of the run
# (that key replaced) goes through the same rules as the run, so a task term is held to what its twin is (signs,
# patch multiples, fbank frames against the audio patch, ...).


def _check_task_term(cfg: Config, pair: str, term: str, value: object) -> None:
    """Raise naming data.tasks.<pair>.<term> when the run, with the term in its twin's place, breaks a rule."""
    twin = task_twins()[term]
    problem = _value_problem(replaced(cfg, twin.split("."), value))
    if problem is not None:
        key, broken, need = problem
        where = f"data.tasks.{pair}.{term}={value}"
        raise ConfigError(f"{where}: {need}" if key == twin else f"{where} (as {twin}): {key}={broken}: {need}")


def _drop_token_rules(prefix: str, rates: dict, allowed, what: str) -> list[Rule]:
    """model.drop_token and a task's: each rate in [0, 1), for a modality in `allowed`."""
    return [(f"{prefix}.{mod}", rate, mod in allowed and 0.0 <= rate < 1.0, f"needs {what} and a rate in [0, 1)")
            for mod, rate in rates.items()]


def _validate_tasks(cfg: Config) -> None:
    """data.tasks: keys are pairs spelled as mmpt.modality spells them; the terms of a pair data.sources feeds are
    held to their run-wide twins' rules (another pair's wait unused); some task trains from step 0."""
    fed = {pair_name(*s.modalities) for s in cfg.data.sources}
    late = {k: t.start_step for k, t in cfg.data.tasks.items() if t.start_step > 0 and k in fed}
    if fed and fed <= set(late):
        named = ", ".join(f"{k}.start_step={v}" for k, v in sorted(late.items()))
        raise ConfigError(f"data.tasks: every task starts late ({named}); at least one must start at step 0")
    for key, t in cfg.data.tasks.items():
        names = key.split("-")
        spelled = pair_name(*names) if len(names) == 2 and all(n in MODALITIES for n in names) else None
        if key not in fed and spelled == key:
            continue  # a pair this run does not feed (data.sources overridden): its terms wait unused
        if key not in fed:
            hint = f"; it is spelled '{spelled}'" if spelled and spelled != key else ""
            raise ConfigError(f"data.tasks.{key}: no source feeds this pair (tasks: {', '.join(sorted(fed))}){hint}")
        for term in task_twins():
            if getattr(t, term) is not None:
                _check_task_term(cfg, key, term, getattr(t, term))
        # No run-wide twin: loss.*_weight weigh loss terms, this weighs a whole task (0 would train it for nothing)
        _raise(_broken([(f"data.tasks.{key}.loss_weight", t.loss_weight, t.loss_weight > 0, "must be positive"),
                        (f"data.tasks.{key}.start_step", t.start_step, t.start_step >= 0, "must be >= 0")]
                       + _grouping_rules(cfg, key, t)
                       + _drop_token_rules(f"data.tasks.{key}.drop_token", t.drop_token or {}, names,
                                           "a modality of the pair")))


def _grouping_rules(cfg: Config, key: str, t) -> list[Rule]:
    """group_by and group_size come together; a batch holds whole groups."""
    if not t.group_by:
        return [(f"data.tasks.{key}.group_size", t.group_size, t.group_size == 0, f"needs data.tasks.{key}.group_by")]
    batch = t.batch_size or cfg.data.batch_size
    return [(f"data.tasks.{key}.group_size", t.group_size, t.group_size >= 2 and batch % t.group_size == 0,
             f"must be >= 2 and divide the task's batch size {batch} (data.tasks.{key}.group_by is set)")]


def _validate_modalities(cfg: Config) -> None:
    m, known = cfg.model, ", ".join(MODALITIES)
    for mod in m.modalities:
        if mod not in MODALITIES:
            raise ConfigError(f"model.modalities: unknown modality '{mod}' (known: {known}; more come from plugins)")
    _raise(_broken(_drop_token_rules("model.drop_token", m.drop_token, MODALITIES, "a known modality")))
    _validate_own_trunk(cfg)
    if not cfg.data.sources:
        raise ConfigError("data.sources: at least one source is needed")
    for i, src in enumerate(cfg.data.sources):
        if len(src.modalities) != 2 or len(set(src.modalities)) != 2:
            raise ConfigError(f"data.sources[{i}].modalities={src.modalities}: must name two different modalities")
        missing = [x for x in src.modalities if x not in m.modalities]
        if missing:
            raise ConfigError(f"data.sources[{i}].modalities: {missing} not in model.modalities={m.modalities}")
        if src.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight={src.weight}: must be positive")
    for name, entry in EVALS.items():
        for i, item in enumerate(getattr(cfg.eval, name)):
            problem = entry.check(cfg, item)
            if problem:
                raise ConfigError(f"eval.{name}[{i}].{problem}")


def _validate_own_trunk(cfg: Config) -> None:
    m, plan = cfg.model, stem_plan(cfg.model)
    for mod in m.own_trunk:
        if mod not in m.modalities:
            raise ConfigError(f"model.own_trunk: '{mod}' is not in model.modalities={m.modalities}")
        if plan[mod][0] != mod:
            raise ConfigError(f"model.own_trunk: '{mod}' borrows the {plan[mod][0]} encoder (model.image_as_video); "
                              f"name '{plan[mod][0]}' instead")


def _validate_moe(cfg: Config) -> None:
    moe = cfg.model.moe
    if moe.backend == "deepspeed" and moe.num_experts > 1 and cfg.deepspeed.zero_stage > 2:
        raise ConfigError("model.moe.backend=deepspeed needs deepspeed.zero_stage <= 2 (DeepSpeed refuses its MoE "
                          "under ZeRO-3); use model.moe.backend=native")
    if moe.backend == "deepspeed" and moe.ep_size > 1 and cfg.eval.every and any(getattr(cfg.eval, n) for n in EVALS):
        raise ConfigError("eval.every with model.moe.backend=deepspeed and ep_size > 1: expert all_to_all needs the "
                          "same batches on every rank, eval splits differ; set eval.every=0 and evaluate the export")
    if moe.backend == "deepspeed" and moe.router == "expert_choice":
        raise ConfigError("model.moe.router=expert_choice is native-only; set model.moe.backend=native")
    if moe.num_experts > 1 and (moe.num_experts % moe.ep_size or moe.top_k not in (1, 2)):
        raise ConfigError(f"model.moe: num_experts={moe.num_experts} must be divisible by ep_size={moe.ep_size} and "
                          f"top_k={moe.top_k} must be 1 or 2")
