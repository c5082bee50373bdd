"""Shared config plumbing: every component config is a dataclass that reads the upstream config.json
(diffusers / transformers) and refuses keys or values it does not implement, naming them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

__all__ = ["ConfigError", "read_json", "from_dict", "to_dict"]


class ConfigError(ValueError):
    """A config key or value that mdref does not support, or a config file that cannot be read."""


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def from_dict(cls, d, *, ignore=(), where=None):
    """Build dataclass `cls` from a dict. Keys starting with '_' (diffusers' bookkeeping) and keys in
    `ignore` (documented as having no effect on the forward pass) are skipped; any other unknown key raises."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and not k.startswith("_") and k not in ignore)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unsupported config keys {unknown}")
    return cls(**{k: v for k, v in d.items() if k in fields})


def to_dict(cfg):
    return dataclasses.asdict(cfg)
