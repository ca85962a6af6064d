"""Hyperparameters per method and model: `configs/methods/<method>/*.yaml`, then overrides.

Every file but `default.yaml` says which models it is for:

    match: {model_types: [llama, mistral], num_layers: 32}
    hparams: {layer: 5, steps: 25, ...}

`default.yaml` (no `match`) applies to every model; the matching file's values replace its ones,
and a request's overrides replace both. A `layer: null` default means num_layers // 6 (ROME's
early-middle MLP, layer 5 of 32 for 7B Llama; 17 of 48 in GPT-2 XL was chosen by causal tracing).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "methods"

T = TypeVar("T")


def _read(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("hparams", {}), dict):
        raise ValueError(f"{path} must hold a mapping with an `hparams` mapping")
    return data


def defaults_for(method: str, model_type: str, num_layers: int) -> dict[str, Any]:
    """The merged defaults of `default.yaml` and the file matching this model, if any."""
    folder = CONFIG_DIR / method
    merged: dict[str, Any] = {}
    default = folder / "default.yaml"
    if default.is_file():
        merged.update(_read(default).get("hparams", {}))
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "default.yaml":
            continue
        data = _read(path)
        match = data.get("match") or {}
        if model_type in match.get("model_types", []) and match.get("num_layers") == num_layers:
            merged.update(data.get("hparams", {}))
            break
    if "layer" in merged and merged["layer"] is None:  # methods without a layer have no key
        merged["layer"] = max(0, num_layers // 6)
    return merged


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """`value` as `kind` (int, float, bool or str, or one of them | None); ints pass as floats,
    nothing else converts."""
    args = typing.get_args(kind)
    if type(None) in args:  # an optional value
        if value is None:
            return None
        (kind,) = [a for a in args if a is not type(None)]
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ValueError(f"hyperparameter {name!r} must be {names[kind]}, not {value!r}")
    return float(value) if kind is float else value


def load_hparams(
    cls: type[T],
    method: str,
    model_type: str,
    num_layers: int,
    overrides: dict[str, Any] | None = None,
) -> T:
    """An instance of the dataclass `cls` from the config files and `overrides`.

    Raises ValueError (whose message a client can read) on unknown names or wrong types.
    """
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"hyperparameter overrides must be a mapping, not {overrides!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = defaults_for(method, model_type, num_layers)
    for source, given in (("config", values), ("request", overrides or {})):
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(
                f"unknown {method} hyperparameter(s) in {source}: {', '.join(unknown)}; "
                f"known ones: {', '.join(sorted(known))}"
            )
    merged = {**values, **(overrides or {})}
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in merged.items()})
