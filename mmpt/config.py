"""Typed run configuration: dataclasses loaded from YAML, with dotted CLI overrides.

    cfg = load_config("demo", ["train.steps=50", "model.width=64"])

`NAME` resolves to the YAML shipped in `mmpt/configs/NAME.yaml`; anything else is a path. An override's
number indexes a list the config has (`data.sources.0.weight=2`). Every user mistake (unknown key, wrong type,
missing file, a value out of range: `mmpt.config_checks`) raises `ConfigError` whose message names the dotted
key or the file, so the CLI can print one line and exit.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mmpt.errors import ConfigError, UntrustedPluginError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class SourceConfig:
    name: str = "digits"
    shards: str = "data/demo/train"  # shard dir (with sizes.json), brace pattern, glob, or pipe:/http URLs
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])  # the pair this source feeds
    weight: float = 1.0  # share of its task's samples (sources feeding one pair form a task)
    # This source's changes to data.augment, merged field by field ({audio: {noise_snr_db: [5, 30]}}), or
    # false / "none": no augmentation (AugmentConfig.off()). None: data.augment as it is.
    augment: Any = None


@dataclass
class VideoConfig:
    """How video is decoded (data.video)."""
    num_frames: int = 8
    fps: Optional[float] = None  # None: frames spread uniformly over the clip
    window_seconds: Optional[float] = None  # with fps: a random (train) / centred (eval) window of S seconds


@dataclass
class AudioConfig:
    """How audio is decoded (data.audio): mono, resampled, cropped/padded, Kaldi log-mel fbank."""
    sample_rate: int = 16000
    seconds: float = 1.0
    num_mel_bins: int = 128
    norm_mean: float = -4.27  # AST/ImageBind AudioSet statistics of the log-mel fbank
    norm_std: float = 4.57
    # dataset: (fbank - norm_mean) / (2 norm_std), AST's. utterance: each mel bin's mean over the clip is
    # removed first (cepstral mean normalisation), which takes out a voice's or a channel's fixed spectral
    # envelope, then the same scale.
    norm: Literal["dataset", "utterance"] = "dataset"

    @property
    def num_frames(self) -> int:
        """Kaldi fbank frames of the fixed-length clip: 25 ms windows every 10 ms, edges snipped."""
        n, win, hop = int(self.seconds * self.sample_rate), int(0.025 * self.sample_rate), int(0.01 * self.sample_rate)
        return 1 + (n - win) // hop


OFF_WORDS = (False, "none", "off")  # a section set to one of these is switched off: its class's off()


@dataclass
class ImageAugment:
    """Training augmentation of images (data.augment.image); eval decoding never augments. See mmpt.data.augment."""
    # resized: RandomResizedCrop(scale, ratio); mild: the crop mmpt had before (a square of the shorter side x
    # sqrt(U(0.8, 1)) at a random place, scale/ratio unused); center: the eval crop, no random crop at all.
    crop: Literal["resized", "mild", "center"] = "resized"
    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # crop area / image area
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # crop width / height
    flip_p: float = 0.0  # horizontal flip probability: off, digits and text are not mirror symmetric
    jitter_p: float = 0.8  # probability of colour jitter (SimCLR's RandomApply)
    brightness: float = 0.3  # factors drawn from [1 - b, 1 + b]
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.0  # shift drawn from [-hue, hue] (<= 0.5); RGB<->HSV costs ~2.6 ms per 224 px image
    randaugment_ops: int = 0  # RandAugment ops per image (0: off; 2 is the paper's ImageNet setting)
    randaugment_magnitude: int = 9  # 0..30 (torchvision's 31 bins)

    @classmethod
    def off(cls):
        """No augmentation: the training crop mmpt had before augmentation was configurable."""
        return cls(crop="mild", flip_p=0.0, jitter_p=0.0, randaugment_ops=0)


@dataclass
class VideoAugment(ImageAugment):
    """Training augmentation of video (data.augment.video): one draw of the image settings applied to every
    frame of a clip, plus temporal jitter. crop "mild" is the random size x size window video had before."""
    # Temporal jitter: the stride between sampled frames x U(lo, hi) at a random start. Frames spread over
    # the clip (data.video.fps unset): they span lo..hi of it (capped at 1); at data.video.fps: a slower or
    # faster stride. [1, 1]: the frames of before.
    stride_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])

    @classmethod
    def off(cls):
        aug = super().off()
        aug.stride_scale = [1.0, 1.0]
        return aug


@dataclass
class AudioAugment:
    """Training augmentation of audio (data.augment.audio): waveform (speed, noise, gain), then fbank (pitch
    warp, SpecAugment masks). Each is off at its neutral value, noted on the right. See mmpt.data.augment."""
    speed: list[float] = field(default_factory=lambda: [0.9, 1.1])  # factor, resampled in 0.01 steps; [1, 1]
    noise_p: float = 0.5  # probability of mixing background noise; 0
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 40.0])  # signal-to-noise ratio drawn
    noise_colors: list[Literal["white", "pink", "brown"]] = field(default_factory=lambda: ["white", "pink", "brown"])
    noise_files: Optional[str] = None  # real noise too: a folder of audio files, or a shard spec of audio
    gain_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])  # [0, 0]
    pitch_semitones: list[float] = field(default_factory=lambda: [-1.0, 1.0])  # fbank frequency warp; [0, 0]
    freq_masks: int = 1  # SpecAugment: masks of U{0..width} mel bins; 0
    freq_mask_width: int = 24
    time_masks: int = 2  # ... and of U{0..width} frames (10 ms each); 0
    time_mask_width: int = 20

    @classmethod
    def off(cls):
        """No augmentation: the random window of before only."""
        return cls(speed=[1.0, 1.0], noise_p=0.0, gain_db=[0.0, 0.0], pitch_semitones=[0.0, 0.0], freq_masks=0,
                   time_masks=0)


@dataclass
class AugmentConfig:
    """data.augment: every source's training augmentation, per modality (a source may change it: its own
    `augment`). `data.augment: false` (or one section: `data.augment.audio: false`) switches it off."""
    image: ImageAugment = field(default_factory=ImageAugment)
    video: VideoAugment = field(default_factory=VideoAugment)
    audio: AudioAugment = field(default_factory=AudioAugment)

    @classmethod
    def off(cls):
        return cls(ImageAugment.off(), VideoAugment.off(), AudioAugment.off())


@dataclass
class TaskTerms:
    """data.tasks.<pair>, e.g. data.tasks.video-text: one task's own terms (IMP trains each task at its own batch
    and resolution); a field left unset takes the run's. Position embeddings interpolate to each resolution."""
    batch_size: Optional[int] = None  # per rank; None: data.batch_size
    loss_weight: float = 1.0  # multiplies the task's whole loss before backward
    image_size: Optional[int] = None  # images and video frames (a multiple of model.patch_size); None: model.image_size
    num_frames: Optional[int] = None  # video frames; None: data.video.num_frames
    audio_seconds: Optional[float] = None  # None: data.audio.seconds
    drop_token: Optional[dict[str, float]] = None  # modality -> DropToken rate; None: model.drop_token


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
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
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
class VideoStemConfig:
    """The video stem (model.video): t x p x p tubelets, position embeddings laid out for `frames`."""
    frames: int = 8  # frames the position embedding is laid out for (other counts interpolate)
    tubelet: int = 2  # frames per token


@dataclass
class AudioStemConfig:
    """The audio stem (model.audio): the log-mel spectrogram as a one-channel image cut in patch x patch."""
    frames: int = 98  # fbank frames the position embedding is laid out for (other durations interpolate)
    mel: int = 128  # mel bins it is laid out for
    patch: int = 16


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
    video: VideoStemConfig = field(default_factory=VideoStemConfig)
    audio: AudioStemConfig = field(default_factory=AudioStemConfig)
    drop_token: dict[str, float] = field(default_factory=dict)  # modality -> fraction of tokens dropped in training
    image_as_video: bool = False  # images go through the video stem as repeated frames (IMP)
    stem: Literal["linear", "conv"] = "linear"  # patch projection of image/video/audio: one linear layer, or convs
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


@dataclass
class ZeroShotEval:
    """One zero-shot classification eval (`mmpt eval zeroshot`, and during training with eval.every)."""
    modality: str = "image"
    data: Optional[str] = None  # shards, a folder per class, or a CSV/JSONL manifest with labels; None: data.val
    classes: Optional[str] = None  # {"classnames": [...], "templates": [...] (optional)}; None: data.classes
    templates: Optional[str] = None  # a shipped template set (photo, action, sound, speech) over the file's


@dataclass
class RetrievalEval:
    """One retrieval eval in both directions over paired samples (`mmpt eval retrieval`)."""
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    data: Optional[str] = None  # shards of paired samples; None: data.val


@dataclass
class EvalConfig:
    batch_size: int = 256
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    workers: int = 1  # decoding processes per rank
    every: int = 0  # run the evals below every N training steps on all ranks (0: not during training)
    zeroshot: list[ZeroShotEval] = field(default_factory=list)
    retrieval: list[RetrievalEval] = field(default_factory=list)
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
        return dataclasses.asdict(self)


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Coerce/validate one leaf value against its annotation; raise naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _check_value(value, inner[0], key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
    if origin is list or tp is list:
        if isinstance(value, list):
            item = args[0] if args else Any
            if dataclasses.is_dataclass(item):
                return [_build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
            return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            item = args[1] if args else Any
            if dataclasses.is_dataclass(item):
                return {k: _build(item, v, f"{key}.{k}.") for k, v in value.items()}
            return {k: _check_value(v, item, f"{key}.{k}") for k, v in value.items()}
    elif _scalar_ok(value, tp):
        return float(value) if tp is float else value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _scalar_ok(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string
        try:
            float(value)
            return True
        except ValueError:
            return False
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, (int, float)) if tp is float else isinstance(value, tp)


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            moved = _OLD_MODEL_KEYS.get(key) if prefix == "model." else None
            hint = f"; it is model.{'.'.join(moved)} now" if moved else ""
            raise ConfigError(f"unknown key '{prefix}{key}' (valid: {', '.join(sorted(names))}){hint}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and hasattr(tp, "off") and _is_off(value):
            kwargs[key] = tp.off()
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _is_off(value: Any) -> bool:
    return any(value is word if isinstance(word, bool) else value == word for word in OFF_WORDS)


def resolve_augment(default: AugmentConfig, override: Any, key: str) -> AugmentConfig:
    """A source's augmentation: data.augment with the source's `augment` merged into it field by field
    (`{audio: {noise_p: 0}}` changes one field), switched off by false / "none", unchanged by None or true.
    Errors name `key` (data.sources[i].augment) and the field."""
    if override is None or override is True:
        return default
    if _is_off(override):
        return AugmentConfig.off()
    if not isinstance(override, dict):
        raise ConfigError(f"{key}={override!r}: expected per-modality changes ({{audio: {{noise_p: 0}}}}) or false")
    merged: dict = dataclasses.asdict(default)
    for section, fields in override.items():
        base = merged.get(section)
        merged[section] = {**base, **fields} if isinstance(base, dict) and isinstance(fields, dict) else fields
    return _build(AugmentConfig, merged, f"{key}.")


def source_augment(cfg: Config, index: int) -> AugmentConfig:
    """The resolved training augmentation of data.sources[index]."""
    return resolve_augment(cfg.data.augment, cfg.data.sources[index].augment, f"data.sources[{index}].augment")


def resolve_path(name_or_path: str) -> Path:
    """A shipped config name (`demo`) or a YAML path."""
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name_or_path}': no such file and not a shipped config ({', '.join(names)})")


def _apply_override(data: dict, item: str) -> None:
    """`a.b.c=value`; a number indexes a list the config already has (`data.sources.0.weight=2`)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {yaml_problem(e)}") from None
    node: Any = data
    parts, created = key.split("."), False
    for i, part in enumerate(parts):
        slot = _slot(node, part, key, ".".join(parts[:i]) or "the config", created)
        if i == len(parts) - 1:
            node[slot] = value
            return
        created = isinstance(node, dict) and node.get(slot) is None  # absent from the file (or empty there)
        if created:
            node[slot] = {}
        node = node[slot]


def _slot(node: Any, part: str, key: str, where: str, created: bool) -> int | str:
    """Where one part of an override's key leads in the raw config: a section's key, or an index into a list
    the config has (a number never appends, and never indexes a section or a list the file does not hold)."""
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return int(part)
        raise ConfigError(f"override '{key}': {where} is a list of {len(node)}; '{part}' is not an index "
                          f"0..{len(node) - 1}")
    if not isinstance(node, dict):
        raise ConfigError(f"override '{key}': {where}={node!r} is a value, not a section or list")
    if part.isdigit():
        raise ConfigError(f"override '{key}': " + (f"{where} is not in the config file; set the whole list "
                          f"({where}=[...])" if created else f"{where} is a section, not a list"))
    return part


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line (its str() spans several, quoting the text around the mark)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def import_plugins(names: list, trust: bool = True) -> None:
    """Import the modules a config names in `plugins` (they register modalities), naming the one that fails.

    trust=False is for a config that came with a model (run, export, hub repo): importing a module it names
    runs code chosen by whoever wrote the file, so only modules imported already pass (importing those again
    runs nothing: they were the user's own choice) and any other is an UntrustedPluginError before any import."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"plugins: expected a list of module names, got {names!r}")
    untrusted = [n for n in names if n not in sys.modules]
    if untrusted and not trust:
        raise UntrustedPluginError(
            f"plugins: loading this model would import '{untrusted[0]}', code named by the file; if you trust it, "
            f"pass --trust-plugins (Python: trust_plugins=True) or import it first (mmpt --plugin {untrusted[0]})")
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise ConfigError(f"plugins: cannot import '{name}': {type(e).__name__}: {e}") from None


# Keys of run configs written before model.video / model.audio were sections (read by config_from_dict).
_OLD_MODEL_KEYS = {"video_frames": ("video", "frames"), "tubelet": ("video", "tubelet"),
                   "audio_frames": ("audio", "frames"), "audio_mel": ("audio", "mel"),
                   "audio_patch": ("audio", "patch")}


def upgrade_old_keys(data: dict) -> dict:
    """A resolved run config from an older mmpt -> today's layout (so old runs still evaluate and export)."""
    model = data.get("model")
    if isinstance(model, dict):
        for old, (section, key) in _OLD_MODEL_KEYS.items():
            if old in model:
                model.setdefault(section, {})[key] = model.pop(old)
    return data


def _from_dict(data: dict, trust_plugins: bool = True) -> Config:
    from mmpt.config_checks import validate  # it imports ConfigError from here

    import_plugins(data.get("plugins") or [], trust_plugins)
    return validate(_build(Config, data, ""))


def load_config(name_or_path: str, overrides: Optional[list] = None) -> Config:
    path = resolve_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        _apply_override(data, item)
    return _from_dict(data)


def config_from_dict(data: dict, trust_plugins: bool = False) -> Config:
    """A resolved config as a run directory or an export stores it (older layouts are upgraded). It came with a
    model, not from the user: its plugins are imported only with trust_plugins (see import_plugins)."""
    return _from_dict(upgrade_old_keys(data), trust_plugins)
