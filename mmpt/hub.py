"""Publishing exports to a Hugging Face Hub and loading models back.

    push("exports/demo", "my-org/mmpt-demo")                 # create_repo(exist_ok) + upload_folder
    pretrained = mmpt.from_pretrained("hf-hub:my-org/mmpt-demo")
    emb = pretrained.model.encode("image", pretrained.preprocess["image"](jpeg_bytes)[None])["emb"]

A model source is `hf-hub:ORG/NAME[@revision]` (snapshot_download of an export), `local-dir:PATH` (an export
directory), or a PATH (an export or a run directory). Downloaded weights are read with safetensors only:
nothing fetched from a hub is unpickled. The token comes from `token=`, else huggingface_hub's usual sources
(HF_TOKEN, `huggingface-cli login`); error messages never contain it. HF_ENDPOINT points huggingface_hub at
another server (tests/hub_server.py is a local test double). A model whose config names `plugins` that are not
imported yet loads only with trust_plugins=True: importing them runs code the repo chose (as transformers'
trust_remote_code).
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpt import modality as registry
from mmpt.config import Config
from mmpt.config.checks import HF_HUB, LOCAL_DIR, REPO_ID
from mmpt.data.media import DecodeSettings
from mmpt.data.tokenizer import get_tokenizer
from mmpt.errors import DataError
from mmpt.export import (
    CARD,
    CONFIG,
    HF_TOKENIZER_DIR,
    OPENCLIP,
    PREPROCESSING,
    TOKENIZER,
    WEIGHTS,
    load_pretrained,
)

# What a download fetches: an export's files only (a repo's pickled checkpoints, if any, stay on the hub).
EXPORT_PATTERNS = [WEIGHTS, CONFIG, TOKENIZER, PREPROCESSING, CARD, f"{HF_TOKENIZER_DIR}/*"]


class HubError(DataError):
    """A hub request failed (HTTP error, connection, bad repo id): one line, never the token. `status`: the HTTP
    status when the server answered (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _status(error: Exception) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _describe(error: Exception, token: Optional[str] = None) -> str:
    """One line for a failed hub call (huggingface_hub's messages span lines), with every token replaced."""
    import requests
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    first = next((s.strip() for s in str(error).splitlines() if s.strip()), type(error).__name__)
    if isinstance(error, RevisionNotFoundError):
        line = f"revision not found (HTTP {status})"
    elif isinstance(error, RepositoryNotFoundError):
        line = f"repository not found, or private and the token cannot read it (HTTP {status})"
    elif isinstance(error, LocalEntryNotFoundError):
        line = f"cannot reach {constants.ENDPOINT}, and no earlier download is cached"
    elif status is None and isinstance(error, requests.exceptions.RequestException):
        line = f"cannot reach {constants.ENDPOINT} ({type(error).__name__})"
    else:
        line = first + (" (check the token: HF_TOKEN or `huggingface-cli login`)" if status in (401, 403) else "")
    for secret in (token, get_token()):
        if secret:
            line = line.replace(secret, "***")
    return line


def _hub_errors() -> tuple:
    import requests
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    return HfHubHTTPError, LocalEntryNotFoundError, requests.exceptions.RequestException, ValueError


def push(export_dir: str | Path, repo: str, private: bool = False, revision: str | None = None,
         token: str | None = None) -> str:
    """Upload an export directory to ORG/NAME (created if missing) on `revision` (a branch, created from main
    if missing; default main). Returns the commit URL."""
    export_dir = Path(export_dir)
    if not (export_dir / WEIGHTS).is_file() or not (export_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{export_dir}: not an export directory (no {WEIGHTS} / {CONFIG}; run `mmpt export`)")
    if not REPO_ID.fullmatch(repo):
        raise DataError(f"repo '{repo}': expected ORG/NAME")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(export_dir), revision=revision,
                                 commit_message=f"mmpt export {export_dir.name}")
    except _hub_errors() as e:
        raise HubError(f"push to {repo} failed: {_describe(e, token)}", _status(e)) from None
    return info.commit_url


def _unchanged(operation, remote: dict | None) -> bool:
    """Whether the repo's file (remote: {"sha256": LFS oid or None, "git": git blob id}) has the content of this
    CommitOperationAdd, whose sha256 huggingface_hub computed once already for the upload."""
    if remote is None:
        return False
    if remote["sha256"]:  # an LFS file
        return operation.upload_info.sha256.hex() == remote["sha256"]
    data = Path(operation.path_or_fileobj).read_bytes()  # a regular file: small
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == remote["git"]


def ensure_repo(repo: str, private: bool = False, revision: str | None = None) -> None:
    """ORG/NAME exists (created if missing), and so does the branch `revision` (from main). A wrong token fails
    here, in one request. The token: HF_TOKEN or `huggingface-cli login`."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
    except _hub_errors() as e:
        raise HubError(f"push to {repo} failed: {_describe(e)}", _status(e)) from None


def commit_files(repo: str, files: dict[str, Path], delete: list[str], message: str, revision: str | None = None,
                 remote: dict | None = None) -> str:
    """One commit on ORG/NAME (see ensure_repo) at `revision`: `files` (path in the repo -> local file) added,
    except those whose content the repo has already (`remote`, from remote_files), and `delete` (folders in the
    repo, "dir/") removed. Weights go through LFS. Returns the commit URL; raises HubError with the HTTP status."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    api = HfApi()
    remote = remote or {}
    adds = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in sorted(files.items())]
    operations: list = [op for op in adds if not _unchanged(op, remote.get(op.path_in_repo))]
    operations += [CommitOperationDelete(path_in_repo=p, is_folder=True) for p in delete]
    if not operations:
        return f"{constants.ENDPOINT}/{repo} (no file changed: no commit)"
    try:
        info = api.create_commit(repo, operations, commit_message=message, revision=revision)
    except _hub_errors() as e:
        raise HubError(f"push to {repo} failed: {_describe(e)}", _status(e)) from None
    return info.commit_url


def remote_files(repo: str, revision: str | None = None) -> dict[str, dict]:
    """The files of ORG/NAME at `revision`: path -> {"size", "git" (blob id), "sha256" (LFS files; else None)};
    {} for a repo or branch that does not exist yet."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        siblings = HfApi().model_info(repo, revision=revision or None, files_metadata=True).siblings or []
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}
    except _hub_errors() as e:
        raise HubError(f"listing {repo} failed: {_describe(e)}", _status(e)) from None
    return {s.rfilename: {"size": s.size, "git": s.blob_id, "sha256": s.lfs.sha256 if s.lfs else None}
            for s in siblings}


def download(ref: str, patterns: list[str], dest: Path | None = None) -> Path:
    """The files of hf-hub ref ORG/NAME[@revision] matching `patterns`: into huggingface_hub's cache (returns the
    snapshot folder), or under `dest` (real files; returns dest)."""
    repo, _, revision = ref.partition("@")
    if not REPO_ID.fullmatch(repo):
        raise DataError(f"{HF_HUB}{ref}: expected {HF_HUB}ORG/NAME[@revision]")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns, local_dir=dest))
    except _hub_errors() as e:
        raise HubError(f"{HF_HUB}{ref}: download failed: {_describe(e)}", _status(e)) from None


# ---- loading -----------------------------------------------------------------------------------------------

def resolve_source(source: str) -> tuple[Path, bool]:
    """(local directory, whether it must be an export) for a model source; downloads hf-hub repos."""
    if source.startswith(HF_HUB):
        return download(source[len(HF_HUB):], EXPORT_PATTERNS), True
    if source.startswith(LOCAL_DIR):
        return Path(source[len(LOCAL_DIR):]), True
    scheme = re.match(r"([A-Za-z][\w+.-]+):", source)  # two letters at least: C:\ stays a path
    if scheme and not Path(source).exists():
        raise DataError(f"model source '{source}': unknown scheme '{scheme.group(1)}:' "
                        f"(use {HF_HUB}ORG/NAME[@revision], {LOCAL_DIR}PATH or a directory)")
    return Path(source), False


def _tokenizer_name(path: Path, cfg) -> str:
    """The tokenizer an export ships (tokenizer.json), else the run config's."""
    if not (path / TOKENIZER).is_file():
        return cfg.data.tokenizer
    info = json.loads((path / TOKENIZER).read_text())
    if info.get("context_length") != cfg.model.context_length:
        raise DataError(f"{path / TOKENIZER}: context_length {info.get('context_length')} but the config has "
                        f"{cfg.model.context_length}")
    return OPENCLIP if info.get("kind") == OPENCLIP else str(path / info.get("path", HF_TOKENIZER_DIR))


def _load(source: str, trust_plugins: bool = False):
    path, export_only = resolve_source(str(source))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such export or run directory")
    if export_only and not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{source}: no {WEIGHTS} (an export made by `mmpt export` is needed)")
    model, cfg = load_pretrained(path, trust_plugins=trust_plugins)
    # An export's HuggingFace tokenizer is its tokenizer/ copy, wherever the training run read it from.
    cfg.data.tokenizer = _tokenizer_name(path, cfg)
    return path, model, cfg


def load_model(source: str, trust_plugins: bool = False):
    """(model in eval mode, Config) for the CLI's --model: any model source; run directories consolidate checkpoints.
    cfg.data.tokenizer names the tokenizer shipped with an export. trust_plugins: --trust-plugins."""
    _, model, cfg = _load(source, trust_plugins)
    return model, cfg


class TextTokenizer:
    """texts (a string or a list) -> (N, context_length) int64 token ids, as training tokenized captions."""

    def __init__(self, name: str, context_length: int):
        self.name, self.context_length = name, context_length
        self._tok = get_tokenizer(name, context_length)

    def __call__(self, texts) -> torch.Tensor:
        return self._tok.batch([texts] if isinstance(texts, str) else list(texts))


def _settings_of(entry: dict) -> dict:
    """A preprocessing.json entry's decode settings; exports written by earlier mmpt versions call them "spec"."""
    return entry.get("settings", entry.get("spec", {}))


def _decode(decoder: Callable, settings, data: bytes) -> torch.Tensor:
    return decoder(data, settings, False, random.Random(0))  # eval mode: centre crops, no augmentation


def _preprocessors(path: Path, cfg) -> dict:
    saved = path / PREPROCESSING
    entries = json.loads(saved.read_text())["modalities"] if saved.is_file() else {}
    of_run = DecodeSettings.from_config(cfg)  # a run directory: the run config's settings
    settings = {m: DecodeSettings.from_dict(_settings_of(entries[m]), cfg.data.tokenizer) if m in entries else of_run
                for m in cfg.model.modalities}
    return {m: functools.partial(_decode, registry.get(m).decode, settings[m]) for m in registry.ordered(settings)}


@dataclass
class Pretrained:
    """A loaded model: `model.encode(modality, x)` with x = `preprocess[modality](file bytes)[None]`, or for text
    `tokenizer(texts)`."""
    model: nn.Module
    cfg: Config
    tokenizer: TextTokenizer
    preprocess: dict
    path: Optional[Path] = None


def from_pretrained(source: str, trust_plugins: bool = False) -> Pretrained:
    """Load `hf-hub:ORG/NAME[@revision]`, `local-dir:PATH` or a PATH (export or run directory).
    trust_plugins=True imports the modules its config names in `plugins`; without it a module not imported yet
    is an mmpt.config.UntrustedPluginError naming it, and nothing is imported."""
    path, model, cfg = _load(source, trust_plugins)
    tokenizer = TextTokenizer(cfg.data.tokenizer, cfg.model.context_length)
    return Pretrained(model, cfg, tokenizer, _preprocessors(path, cfg), path)


class OpenClipModel(nn.Module):
    """An mmpt model seen as an open_clip CLIP model (encode_image / encode_text / logit_scale / forward), so
    tools written for open_clip models (open_clip.build_zero_shot_classifier, ...) take it. "Images" are
    whichever modality is paired with text (default image)."""

    def __init__(self, pretrained: Pretrained, modality: str = "image"):
        super().__init__()
        self.model, self.modality = pretrained.model, modality
        self.pair = registry.pair_name(modality, registry.TEXT)
        self.tokenizer, self.preprocess = pretrained.tokenizer, pretrained.preprocess[modality]

    def _encode(self, modality: str, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        emb = self.model.encode(modality, x)["emb"]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode(self.modality, images, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode(registry.TEXT, text, normalize)

    @property
    def logit_scale(self) -> torch.Tensor:
        """Log temperature, as open_clip's parameter (tools call .exp()); clamped as mmpt's forward clamps it."""
        return self.model.logit_scale(self.pair).log()

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None):
        """open_clip's tuple: (image features, text features, logit scale), features unit-norm."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()
