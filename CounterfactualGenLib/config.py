"""Training configs: a JSON file plus ``--set KEY=JSON`` overrides, checked against a script's defaults.

The training scripts (``Training/train_*.py``) each keep their ``DEFAULTS``; :func:`load_config`
merges a config file and the command line's overrides into a copy of them and refuses, before
any work starts, what would otherwise be silently ignored: a key the script does not know (a
typo such as ``"iteration"`` would train with the default for hours), an override without
``=`` or whose value is not JSON (a string needs quotes: ``--set 'init_from="runs/a"'``).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import InputError

__all__ = ["load_config", "check_keys", "parse_override"]


def check_keys(cfg: Mapping[str, Any], defaults: Mapping[str, Any], where: str = "the config") -> None:
    """Refuse keys of ``cfg`` that ``defaults`` does not have, suggesting the closest known key."""
    unknown = [k for k in cfg if k not in defaults]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(defaults), 1, 0.7)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise InputError(f"Unknown key(s) in {where}: {', '.join(hints)}. Known keys: {sorted(defaults)}.")


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=JSON`` → (key, value); a clear error for anything else."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set {text!r}: expected KEY=JSON, e.g. --set iterations=500 or "
                         "--set 'init_from=\"runs/stage1\"'.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise InputError(f"--set {text!r}: the value {value!r} is not JSON. Numbers and true/false/null are "
                         f"written as they are; a string needs double quotes inside the shell's quotes: "
                         f"--set '{key}=\"{value}\"'.") from None


def load_config(defaults: Mapping[str, Any], path: str | Path | None, overrides: Sequence[str] = (), *,
                merge_sections: bool = False) -> dict[str, Any]:
    """``defaults`` ← the JSON object in ``path`` ← each ``KEY=JSON`` of ``overrides``, every key checked.

    Args:
        defaults: the script's ``DEFAULTS`` (not modified).
        path: the config file, or None for the defaults alone.
        overrides: ``--set`` values, applied in order after the file.
        merge_sections: a JSON object given for a key whose default is an object is merged
            into it (the oracle's config) instead of replacing it (the diffusion configs).
    """
    cfg = copy.deepcopy(dict(defaults))
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"Cannot read the config {p}: {exc.strerror or exc}.") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"The config {p} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") \
                from None
        if not isinstance(data, dict):
            raise InputError(f"The config {p} must hold a JSON object, not a {type(data).__name__}.")
        layers.append((f"the config {p}", data))
    if overrides:
        layers.append(("--set", dict(parse_override(o) for o in overrides)))
    for where, layer in layers:
        check_keys(layer, defaults, where)
        for k, v in layer.items():
            if merge_sections and isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
    return cfg
