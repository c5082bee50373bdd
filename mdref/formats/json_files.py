"""JSON files as mdref reads them: UTF-8, one object, no key given twice, nesting bounded; errors name the file.

Imports nothing of mdref: config readers (mdref.io), trace manifests (mdref.trace) and tokenizer folders read JSON
through here.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ConfigError", "read_json", "no_duplicate_keys", "json_type"]


def no_duplicate_keys(error):
    """A json object_pairs_hook that raises error(key) for a key given twice (JSON parsers keep the last)."""
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise error(k)
            seen[k] = v
        return seen
    return hook


class ConfigError(ValueError):
    """A config key or value that mdref does not support, or a config file that cannot be read."""


def read_json(path, error=ConfigError):
    """The JSON object (dict) in `path`; a missing file, bytes that are not UTF-8 JSON, or a JSON value that is not
    an object raise `error` (a ConfigError class) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such config file")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicate_keys(_DuplicateKey))
    except _DuplicateKey as e:
        raise error(f"{path}: the key {e.args[0]!r} appears twice in one object (JSON readers would silently keep "
                    f"the last one)") from None
    except RecursionError:
        raise error(f"{path}: not a config file (JSON nested too deeply to read)") from None
    except (ValueError, OSError) as e:                        # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, found a JSON {json_type(d)}")
    return d


class _DuplicateKey(Exception):
    pass


def json_type(v):
    """The JSON name of a parsed value's type, for error messages."""
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")
