"""Hyperparameters per method and model: `methods/configs/<method>/*.yaml`, then overrides.

The files are package data (read through importlib.resources), so an installed copy resolves
the same tuned values as a checkout.

Every file but `default.yaml` says which models it is for:

    match: {model_types: [llama, mistral], num_layers: 32}
    hparams: {layer: 5, steps: 25, ...}

`default.yaml` (no `match`) applies to every model; the matching file's values replace its ones,
and a request's overrides replace both. A `layer: null` default means num_layers // 6 (ROME's
early-middle MLP, layer 5 of 32 for 7B Llama; 17 of 48 in GPT-2 XL was chosen by causal tracing);
`layers: null` (MEMIT, AlphaEdit) five consecutive layers around it.

Each method's `load_<method>_hparams` then checks the values' ranges with `HparamCheck`.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, TypeVar

import yaml

log = logging.getLogger(__name__)

# Read at call time, so a test can point it elsewhere.
CONFIG_ROOT: Traversable = resources.files("methods") / "configs"

T = TypeVar("T")

_warned: set[tuple[str, str, int]] = set()  # (method, model type, layers) told about once


class MissingDefaults(RuntimeError):
    """No defaults file applies to a method on a model: the configs are not installed (or the
    method has none). Serving on a dataclass's built-in values instead would be silent and wrong."""


def _read(path: Traversable) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("hparams", {}), dict):
        raise ValueError(f"{path} must hold a mapping with an `hparams` mapping")
    return data


def defaults_for(method: str, model_type: str, num_layers: int) -> dict[str, Any]:
    """The merged defaults of `default.yaml` and the file matching this model, if any.

    Raises MissingDefaults when neither exists."""
    folder = CONFIG_ROOT / method
    files = (
        sorted((p for p in folder.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)
        if folder.is_dir()
        else []
    )
    default = [p for p in files if p.name == "default.yaml"]
    matching = []
    for path in files:
        if path.name == "default.yaml":
            continue
        data = _read(path)
        match = data.get("match") or {}
        if model_type in match.get("model_types", []) and match.get("num_layers") == num_layers:
            matching = [(path, data)]
            break
    if not default and not matching:
        raise MissingDefaults(
            f"no {method} hyperparameter defaults for model family {model_type!r} "
            f"({num_layers} layers): no default.yaml and no matching file in {folder} "
            "(is editserve installed with its package data, methods/configs?)"
        )
    # Only a method tuned per family (files beside default.yaml) has something to warn about.
    tuned_elsewhere = len(files) > len(default)
    if tuned_elsewhere and not matching and (method, model_type, num_layers) not in _warned:
        _warned.add((method, model_type, num_layers))
        log.warning(
            "%s: no tuned defaults for %s with %d layers in %s; its default.yaml applies",
            method,
            model_type,
            num_layers,
            folder,
        )
    merged: dict[str, Any] = {}
    if default:
        merged.update(_read(default[0]).get("hparams", {}))
    for _, data in matching:
        merged.update(data.get("hparams", {}))
    return merged


def _default_layers(known: set[str], values: dict[str, Any], num_layers: int) -> None:
    """Fills a missing or null `layer` / `layers` in place."""
    centre = max(0, num_layers // 6)
    if "layer" in known and values.get("layer") is None:
        values["layer"] = centre
    if "layers" in known and values.get("layers") is None:
        low = max(0, min(centre - 2, num_layers - 5))
        values["layers"] = list(range(low, min(num_layers, low + 5)))


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """`value` as `kind` (int, float, bool or str, or one of them | None); ints pass as floats,
    nothing else converts."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]: a non-empty list of one kind
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"hyperparameter {name!r} must be a non-empty list, not {value!r}")
        return tuple(_coerce(name, item, args[0]) for item in value)
    if type(None) in args:  # an optional value
        if value is None:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, kind)
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
    _default_layers(known, merged, num_layers)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in merged.items()})


class HparamCheck:
    """The range checks of one method's loaded hyperparameters. Problems are gathered, so that
    a client reads all of them in one error (`done`), not one per attempt."""

    def __init__(self, hparams: object) -> None:
        self.hparams = hparams
        self.problems: list[str] = []

    def require(self, ok: bool, problem: str) -> HparamCheck:
        if not ok:
            self.problems.append(problem)
        return self

    def in_range(self, name: str, low: int, high: int) -> HparamCheck:
        value = getattr(self.hparams, name)
        return self.require(low <= value <= high, f"{name} must be in {low}..{high}, not {value}")

    def positive(self, *names: str) -> HparamCheck:
        for name in names:
            value = getattr(self.hparams, name)
            self.require(value > 0, f"{name} must be positive, not {value}")
        return self

    def not_negative(self, *names: str) -> HparamCheck:
        for name in names:
            value = getattr(self.hparams, name)
            self.require(value >= 0, f"{name} must not be negative, not {value}")
        return self

    def one_of(self, name: str, choices: Sequence[str]) -> HparamCheck:
        value = getattr(self.hparams, name)
        return self.require(
            value in choices, f"{name} must be one of {', '.join(choices)}, not {value!r}"
        )

    def cosine_threshold(self, name: str) -> HparamCheck:
        value = getattr(self.hparams, name)
        return self.require(
            -1.0 <= value <= 1.0, f"{name} is a cosine similarity threshold in [-1, 1], not {value}"
        )

    def done(self, heading: str = "") -> None:
        """Raises ValueError (a client reads its message) naming every problem found."""
        if self.problems:
            raise ValueError(heading + "; ".join(self.problems))
