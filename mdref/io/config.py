"""Shared config plumbing: every component config is a dataclass that reads the upstream config.json
(diffusers / transformers) and refuses keys or values it does not implement, naming them.

The value checkers (`check_int`, `check_float`, `check_bool`, `check_choice`, `check_list`) are the one place a
config value's type and range are judged: each returns the value or raises one ConfigError
``"<where>: <key> must be <what>, found <value>"``, where `where` is the config file (or the class, for a config
built in code). Types are JSON's: an int is not a bool, a float is a finite int or float (JSON's NaN / Infinity
are refused), a string is a str.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..formats.json_files import ConfigError, read_json

__all__ = ["ConfigError", "read_json", "from_dict", "to_dict", "check_int", "check_positive_int", "check_float",
           "check_bool", "check_choice", "check_list", "MAX_LAYERS", "MAX_LEVELS", "MAX_WIDTH", "MAX_TIMESTEPS",
           "MAX_VOCAB", "MAX_POSITIONS", "MAX_SAMPLE_SIZE"]

# Upper bounds on what a config may ask for, checked before anything is built: far above every published model,
# low enough that a typo (a billion layers, a 7 TiB noise schedule) is refused with the bound in the message
# instead of filling the machine's memory. (Largest published values: SDXL 10 transformer layers per block,
# OpenCLIP-bigG 32 layers and width 1280 / MLP 5120, Qwen3-VL 2B vocabulary 151,936, 1000 training timesteps.)
MAX_LAYERS = 64              # ResNets / transformer layers per block, encoder layers, decoder blocks, heads ...
MAX_LEVELS = 8               # UNet / decoder resolution levels
MAX_WIDTH = 65_536           # channels, hidden sizes, MLP widths, context widths
MAX_TIMESTEPS = 100_000      # num_train_timesteps
MAX_VOCAB = 1 << 21          # token vocabulary
MAX_POSITIONS = 1 << 16      # position embeddings (text tokens)
MAX_SAMPLE_SIZE = 1 << 12    # default latent side


def from_dict(cls, d, *, ignore=(), default_only=None, where=None):
    """Build dataclass `cls` from a dict. Keys starting with '_' (diffusers' bookkeeping) and keys in
    `ignore` (documented as having no effect on the forward pass) are skipped; any other unknown key raises.
    `default_only` {key: accepted values}: keys taken only at those values (refuse_unsupported_values), else skipped.
    `where` (the file) is passed on to the class's checks (an InitVar of each config class)."""
    where = where or cls.__name__
    if default_only:
        refuse_unsupported_values(d, default_only, where)
        ignore = set(ignore) | set(default_only)
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a config object, found {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and not k.startswith("_") and k not in ignore)
    if unknown:
        raise ConfigError(f"{where}: unsupported config keys {unknown}")
    return cls(**{k: v for k, v in d.items() if k in fields}, where=where)


def refuse_unsupported_values(d, allowed, where):
    """A ConfigError naming the first key of config dict `d` whose value is not among allowed[key] (the keys a
    config class accepts only at the values it implements)."""
    for key, values in allowed.items() if isinstance(d, dict) else ():
        if key in d and d[key] not in values:
            raise ConfigError(f"{where}: {key}={d[key]!r} is not supported (mdref implements only "
                              f"{' or '.join(repr(a) for a in values)})")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


# ---- value checkers ---------------------------------------------------------------------------------------
def _fail(where, key, what, v):
    raise ConfigError(f"{where}: {key} must be {what}, found {v!r}")


def _num(x):
    return f"{x:,}".replace(",", "_") if isinstance(x, int) else f"{x:g}"


def _range(lo, hi, lo_open=False, hi_open=False):
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_num(lo)}"
    return f" {'<' if hi_open else '<='} {_num(hi)}" if hi is not None else ""


def check_int(where, key, v, lo=None, hi=None, *, none=False):
    """An int (not a bool) with lo <= v <= hi (bounds optional); None passes when `none`."""
    if v is None and none:
        return v
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(where, key, f"an int{_range(lo, hi)}{' or null' if none else ''}", v)
    return v


def check_positive_int(where, key, v, hi=None):
    return check_int(where, key, v, 1, hi)


def check_float(where, key, v, lo=None, hi=None, *, nonzero=False, none=False):
    """A finite number (int or float, not a bool) with lo < v < hi (bounds optional, exclusive), != 0 when
    `nonzero`; returned as a float. None passes when `none`."""
    if v is None and none:
        return v
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (lo is not None and v <= lo) or (hi is not None and v >= hi) or (nonzero and v == 0):
        what = f"a finite number{_range(lo, hi, True, True)}{' and not 0' if nonzero else ''}"
        _fail(where, key, what + (" or null" if none else ""), v)
    return float(v)


def check_bool(where, key, v):
    if not isinstance(v, bool):
        _fail(where, key, "true or false", v)
    return v


def check_choice(where, key, v, allowed):
    """One of `allowed` (compared by type too: 1 is not True, "1" is not 1)."""
    if not any(type(v) is type(a) and v == a for a in allowed):
        _fail(where, key, f"one of {list(allowed)}", v)
    return v


def check_list(where, key, v, item=None, *, length=None, min_length=1):
    """A list (or tuple) of `length` (or at least `min_length`) entries, each checked by
    ``item(where, f"{key}[{i}]", entry)``; returned as a list."""
    if not isinstance(v, (list, tuple)):
        _fail(where, key, "a list", v)
    if (length is not None and len(v) != length) or len(v) < min_length:
        _fail(where, key, f"a list of {length if length is not None else f'at least {min_length}'} entries", v)
    return [item(where, f"{key}[{i}]", x) if item else x for i, x in enumerate(v)]
