"""The run config's schema: typed dataclasses, composed with the sections that registered entries bring.

The sections every run has are written here. A modality's own sections (`data.video`, `model.audio`,
`data.augment.image`, the task term `data.tasks.<pair>.num_frames`) come from its registry entry
(`mmpt.modality`, `mmpt.modalities`), and an eval's (`eval.zeroshot`, ...) from the eval registry (`mmpt.evals`):
`config_class()` builds the schema of what is registered now, so a plugin's settings are config keys like any
other, typed and checked. `default_config()` is that schema's defaults; `mmpt.config.loader` fills it from YAML.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mmpt import evals, modality


@dataclass
class SourceConfig:
    name: str = "digits"
    shards: str = "data/demo/train"  # shard dir (with sizes.json), brace pattern, glob, or pipe:/http URLs
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])  # the pair this source feeds
    weight: float = 1.0  # share of its task's samples (sources feeding one pair form a task)
    # This source's changes to data.augment, merged field by field ({audio: {noise_snr_db: [5, 30]}}), or
    # false / "none": the least augmentation (AugmentConfig.minimal()). None: data.augment as it is.
    augment: Any = None


# An augmentation section set to one of these gets its class's minimal(): the least a training sample gets.
MINIMAL_WORDS = (False, "none", "off")


@dataclass
class AugmentConfig:
    """data.augment: every source's training augmentation, per modality (a source may change it: its own
    `augment`). `data.augment: false` (or one section: `data.augment.audio: false`) selects the least: each
    section's minimal(). The sections are the registered modalities' `augment_config`s (config_class())."""

    @classmethod
    def minimal(cls):
        return cls(**{f.name: f.type.minimal() for f in dataclasses.fields(cls)})


@dataclass
class TaskTerms:
    """data.tasks.<pair>, e.g. data.tasks.video-text: one task's own terms (IMP trains each task at its own batch
    and resolution); a field left unset takes the run's. Position embeddings interpolate to each resolution."""
    batch_size: Optional[int] = None  # per rank; None: data.batch_size
    loss_weight: float = 1.0  # multiplies the task's whole loss before backward
    image_size: Optional[int] = None  # images and video frames (a multiple of model.patch_size); None: model.image_size
    drop_token: Optional[dict[str, float]] = None  # modality -> DropToken rate; None: model.drop_token
    # The step this task joins the mix; before it the other tasks share the steps (a run shorter than it never
    # trains the task). A pair whose both sides only make sense once text has shaped them (video-audio from
    # scratch is noise for the shared trunk) starts late.
    start_step: int = 0
    # Hard negatives: each batch is made of runs of group_size samples sharing this field of their json (e.g.
    # "label"), so every sample meets group_size - 1 negatives of its own group, which the easier attribute cannot
    # tell apart. group_size divides the task's batch size.
    group_by: Optional[str] = None
    group_size: int = 0


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    val: str = "data/demo/val"
    classes: str = "data/demo/classes.json"  # classnames + prompt templates for zero-shot
    batch_size: int = 64  # per rank
    num_workers: int = 1
    shuffle_slots: int = 4  # shards read interleaved per worker and source
    shuffle_buffer: int = 256
    pin_memory: bool = False
    prefetch: int = 2
    tokenizer: str = "openclip"  # or a local HuggingFace tokenizer directory
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training only; sources may override it
    bad_sample_limit: float = 0.01  # fraction of skipped samples that stops the run
    max_consecutive_bad: int = 1000  # a source yielding this many bad samples in a row stops the run
    worker_timeout: float = 600.0  # seconds without a batch from a loader worker that stop the run (0: wait forever)
    tasks: dict[str, TaskTerms] = field(default_factory=dict)  # pair name -> that task's own terms


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 or 1: dense trunk
    every: int = 0  # MoE in every k-th layer (layers k-1, 2k-1, ...); ignored when `last` is set
    last: int = 0  # MoE in the last K layers; neither set: every layer
    top_k: int = 1
    router: Literal["token_choice", "expert_choice"] = "token_choice"  # expert choice: encoder only
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    drop_tokens: bool = True  # False: dropless (capacity = the busiest expert's load)
    backend: Literal["native", "deepspeed"] = "native"  # deepspeed: expert parallel, ZeRO <= 2
    ep_size: int = 1
    balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    local_entropy_weight: float = 0.0  # LIMoE
    global_entropy_weight: float = 0.0  # LIMoE, applied below the threshold
    global_entropy_threshold: Optional[float] = None  # default ln(E) / 2


@dataclass
class ModelConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 8
    image_size: int = 32
    context_length: int = 16
    vocab_size: int = 49408  # open_clip BPE
    sot_id: int = 49406
    eot_id: int = 49407
    embed_dim: int = 128
    decoder_layers: int = 1  # unimodal causal text layers of the caption decoder
    decoder_cross_layers: int = 1  # multimodal layers (cross-attend to encoder tokens)
    dropout: float = 0.0
    grad_checkpointing: bool = False
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])  # names in mmpt.modality
    drop_token: dict[str, float] = field(default_factory=dict)  # modality -> fraction of tokens dropped in training
    image_as_video: bool = False  # images go through the video stem as repeated frames (IMP)
    stem: Literal["linear", "conv"] = "linear"  # patch projection of image/video/audio: one linear layer, or convs
    # Modalities that get a trunk of their own, the same shape as the shared one (open_clip's separate text
    # tower: [text]); the rest share one trunk (IMP).
    own_trunk: list[str] = field(default_factory=list)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class LossConfig:
    contrastive_weight: float = 1.0
    caption_weight: float = 1.0
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    contrastive_chunk: Optional[int] = None  # columns per logits chunk (exact, recomputed in backward)
    # GBA-ITC: aggregate inside groups of this many ranks; 0 = all ranks; -1 = the ranks of one node
    contrastive_group_size: int = 0
    contrastive_ring: bool = False  # stream column blocks around the ranks instead of gathering them
    contrastive_kind: Literal["softmax", "sigmoid"] = "softmax"  # InfoNCE, or SigLIP (a learnable bias per pair)
    init_logit_bias: float = -10.0  # sigmoid only (SigLIP's init; pair it with init_temperature: 0.1)
    # Subtract the batch's mean embedding of each modality before the contrastive losses (mmpt.losses.centre);
    # evaluation subtracts the model's running mean of it.
    centre_embeddings: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed JSON


@dataclass
class HubConfig:
    """Pushes to a Hugging Face Hub repo while training (mmpt.train.hub_push). The token comes from HF_TOKEN or
    `huggingface-cli login`, never from the config (the config is pushed with the run)."""
    repo: str = ""  # ORG/NAME; empty: no pushes
    # end: the export after the last step; every_save: an export at every checkpoint; checkpoint: the export and
    # the complete resumable checkpoint under checkpoint/ (replaced at each save); all_checkpoints: every
    # checkpoint kept under checkpoint/<tag>/.
    strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = "every_save"
    private: bool = False
    revision: str = ""  # a branch (created from main if missing); empty: main
    retries: int = 4  # further tries of a failed push, waiting backoff_s, 2*backoff_s, ... between them
    backoff_s: float = 5.0
    final_wait_s: float = 1800.0  # how long the end of the run waits for its last push (after a stop signal: 60 s)


@dataclass
class TrainConfig:
    steps: int = 400
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    out_dir: str = "runs/demo"
    # True: continue exactly from the newest complete checkpoint in out_dir (weights, optimizer, RNG, data
    # streams); "weights": weights, optimizer and step but a fresh data stream; False: start over.
    resume: Literal[True, False, "weights"] = True
    seed: int = 0
    # Micro-batches per optimizer step; >1 computes the contrastive loss over all of them (GradCache).
    accumulate: int = 1
    # The device's dense peak in TFLOP/s for the `mfu` metric (e.g. 989 for an H100 SXM in bf16); None: the
    # datasheet table mmpt.train.throughput.PEAKS (no `mfu` on a CPU or an unlisted device).
    peak_tflops: Optional[float] = None
    hub: HubConfig = field(default_factory=HubConfig)
    # Where a fresh out_dir gets its checkpoint from: hf-hub:ORG/NAME[@revision] (a repo pushed with
    # train.hub.strategy checkpoint / all_checkpoints) or local-dir:PATH (such a repo's download, or a run
    # directory). Ignored once out_dir holds a checkpoint of its own (a restart continues from that one).
    resume_from: str = ""
    # Resume from a checkpoint whose pickles name functions beyond those DeepSpeed and mmpt write (loading it could
    # run code the file chose): only for a source you trust.
    trust_checkpoint: bool = False
    # torch.compile the encoder, decoder and loss forward passes (mmpt.train.engine); compile time is spent at
    # each task's first steps.
    compile: bool = False


@dataclass
class EvalConfig:
    """eval: shared settings, then one list per registered eval (eval.zeroshot: [...], eval.retrieval: [...])."""
    batch_size: int = 256
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    workers: int = 1  # decoding processes per rank
    every: int = 0  # run the evals below every N training steps on all ranks (0: not during training)
    best: str = ""  # metrics.jsonl key whose highest value marks the best checkpoint, e.g. eval/zeroshot/image/top1


@dataclass
class Config:
    name: str = "demo"
    # Modules imported before the config is checked: they register extra modalities (mmpt.modality.register).
    # Named here, every torchrun process imports them; a later `mmpt eval` / export / from_pretrained of the run
    # only with --trust-plugins (trust_plugins=True), or when the module is imported already (`mmpt --plugin`).
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain data, as a run directory and an export store it. A registered modality the run does not use
        leaves its sections out: a plugin imported in this process must not become a key that a process without
        it (an eval of the run, a hub download) would refuse."""
        data = dataclasses.asdict(self)
        unused = set(modality.MODALITIES) - set(self.model.modalities)
        for section in (data["data"], data["data"]["augment"], data["model"]):
            for name in unused & set(section):
                del section[name]
        return data




# ---- composition: the schema of what is registered now --------------------------------------------------

def _extend(base: type, sections: list[tuple[str, Any, Any]]) -> type:
    """`base` with one more field per (name, type, default factory); the same class back when there is none."""
    if not sections:
        return base
    fields = [(name, tp, field(default_factory=factory)) for name, tp, factory in sections]
    cls = dataclasses.make_dataclass(base.__name__, fields, bases=(base,))
    cls.__module__, cls.__doc__ = base.__module__, base.__doc__
    return cls


def _sections(attr: str) -> list[tuple[str, Any, Any]]:
    entries = [m for m in modality.MODALITIES.values() if getattr(m, attr) is not None]
    return [(m.name, getattr(m, attr), getattr(m, attr)) for m in entries]


def config_class() -> type[Config]:
    """The Config class of the registered modalities and evals (rebuilt when a registry changes)."""
    key = tuple((m.name, id(m)) for m in modality.MODALITIES.values()) + tuple((e.name, id(e))
                                                                                for e in evals.EVALS.values())
    return _compose(key)


@functools.lru_cache(maxsize=8)
def _compose(key: tuple) -> type[Config]:
    augment = _extend(AugmentConfig, _sections("augment_config"))
    terms = _extend(TaskTerms, [(name, tp, lambda: None) for m in modality.MODALITIES.values()
                                for name, (_, tp) in m.task_terms.items()])
    data = _extend(DataConfig, _sections("data_config") + [
        ("augment", augment, augment), ("tasks", dict[str, terms], dict)])  # type: ignore[valid-type]
    model = _extend(ModelConfig, _sections("model_config"))
    lists = [(e.name, list[e.config], list) for e in evals.EVALS.values()]  # type: ignore[name-defined]
    evaluation = _extend(EvalConfig, lists)
    return _extend(Config, [("data", data, data), ("model", model, model), ("eval", evaluation, evaluation)])


def default_config() -> Config:
    """The registered schema's defaults."""
    return config_class()()


def augment_class() -> type:
    """data.augment's class for the registered modalities (one field per modality with an augment section)."""
    data = _field_type(config_class(), "data")
    return _field_type(data, "augment")


def _field_type(cls: type, name: str) -> Any:
    """The type of a composed class's field (composition gives each section field its class, not a string)."""
    return next(f.type for f in dataclasses.fields(cls) if f.name == name)


def task_twins() -> dict[str, str]:
    """data.tasks.<pair>.<term> -> the run-wide key it stands in for."""
    twins = {"batch_size": "data.batch_size", "image_size": "model.image_size"}
    for m in modality.MODALITIES.values():
        twins.update({term: key for term, (key, _) in m.task_terms.items()})
    return twins


def replaced(node: Any, path: list[str], value: object) -> Any:
    """A copy of the dataclass tree `node` with the field at `path` set to `value`."""
    inner = value if len(path) == 1 else replaced(getattr(node, path[0]), path[1:], value)
    return dataclasses.replace(node, **{path[0]: inner})


def task_view(cfg: Config, terms: Any) -> Config:
    """The run as one task sees it: each term the task sets (data.tasks.<pair>) in its run-wide twin's place."""
    for term, key in task_twins().items():
        value = getattr(terms, term, None) if terms is not None else None
        if value is not None:
            cfg = replaced(cfg, key.split("."), value)
    return cfg
