"""Loading a run config: YAML (a shipped name or a path), dotted CLI overrides, plugins, then the checks.

    cfg = load_config("demo", ["train.steps=50", "model.width=64"])

`NAME` resolves to the YAML shipped in `mmpt/configs/NAME.yaml`; anything else is a path. An override's
number indexes a list the config has (`data.sources.0.weight=2`). Every user mistake (unknown key, wrong type,
missing file, a value out of range: `mmpt.config.checks`) raises `ConfigError` whose message names the dotted
key or the file, so the CLI can print one line and exit.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from mmpt.config.build import RENAMED_KEYS, build
from mmpt.config.checks import validate
from mmpt.config.schema import Config, config_class
from mmpt.errors import ConfigError, UntrustedPluginError

CONFIG_DIR = Path(__file__).parent.parent / "configs"


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


def upgrade_old_keys(data: dict) -> dict:
    """A resolved run config from an older mmpt -> today's layout (so old runs still evaluate and export)."""
    for old, new in RENAMED_KEYS.items():
        *path, key = old.split(".")
        node = _section(data, path)
        if isinstance(node, dict) and key in node:
            *new_path, new_key = new.split(".")
            target = data
            for part in new_path:
                target = target.setdefault(part, {})
            target[new_key] = node.pop(key)
    return data


def _section(data: dict, path: list[str]) -> Any:
    node: Any = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _from_dict(data: dict, trust_plugins: bool = True) -> Config:
    import_plugins(data.get("plugins") or [], trust_plugins)  # they register modalities: before the schema
    return validate(build(config_class(), data, ""))


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
