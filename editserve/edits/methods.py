"""The editing methods the server offers, and what each accepts.

Each entry adapts one `methods/` module to the service: which edit kinds it supports, how many
requests one edit may carry, how to resolve hyperparameters (defaults per model family plus a
request's overrides; a ValueError says what is wrong) and how to compute a delta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from methods.base import EditContext, EditRequest, ParamDelta

# (model_type, num_layers, overrides) -> hyperparameters (a dataclass)
LoadHparams = Callable[[str, int, dict[str, Any] | None], Any]
Compute = Callable[[EditContext, list[EditRequest], Any], ParamDelta]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kinds: frozenset[str]
    max_requests: int
    load_hparams: LoadHparams
    compute: Compute
    description: str


def _lazy(module: str, name: str) -> Callable:
    """Imports a method's module on first use (methods pull in heavy code)."""

    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args)

    return call


METHODS: dict[str, MethodSpec] = {
    "rome": MethodSpec(
        name="rome",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=8,
        load_hparams=_lazy("methods.rome", "load_rome_hparams"),
        compute=_lazy("methods.rome", "compute_rome"),
        description="rank-one update of one MLP down-projection per request (r-ROME)",
    ),
    "memit": MethodSpec(
        name="memit",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=1000,
        load_hparams=_lazy("methods.memit", "load_memit_hparams"),
        compute=_lazy("methods.memit", "compute_memit"),
        description="a batch of facts spread over several MLP layers by least squares",
    ),
    "alphaedit": MethodSpec(
        name="alphaedit",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=1000,
        load_hparams=_lazy("methods.alphaedit", "load_alphaedit_hparams"),
        compute=_lazy("methods.alphaedit", "compute_alphaedit"),
        description="MEMIT projected onto the null space of preserved and earlier-edited keys",
    ),
    "ft": MethodSpec(
        name="ft",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=100,
        load_hparams=_lazy("methods.ft", "load_ft_hparams"),
        compute=_lazy("methods.ft", "compute_ft"),
        description="FT-M: one down-projection fine-tuned on the target tokens (dense delta)",
    ),
}
