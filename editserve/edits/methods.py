"""The editing methods the server offers, and what each accepts.

Each entry adapts one `methods/` module to the service: which edit kinds it supports, how many
requests one edit may carry, how to resolve hyperparameters (defaults per model family plus a
request's overrides; a ValueError says what is wrong) and how to compute its result.

`payload` says what a method produces: "params", a `ParamDelta` (weights change, through the
ledger), computed as compute(ctx, requests, hparams); or "memory", a `MemoryPayload` (entries of
the edit memory or the GRACE codebook), computed as compute(ctx, memory_ctx, requests, hparams).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from methods.base import ParamDelta
from methods.memory_common import MemoryPayload

# (model_type, num_layers, overrides) -> hyperparameters (a dataclass)
LoadHparams = Callable[[str, int, dict[str, Any] | None], Any]
Compute = Callable[..., ParamDelta | MemoryPayload]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kinds: frozenset[str]
    max_requests: int
    load_hparams: LoadHparams
    compute: Compute
    description: str
    payload: str = "params"  # "params" (ParamDelta) or "memory" (MemoryPayload)
    # Applying it waits for in-flight requests (it changes what a running generation computes:
    # weights, a layer codebook). Prompt memory only changes what new requests are fed.
    drains: bool = True


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
    "ike": MethodSpec(
        name="ike",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=64,
        load_hparams=_lazy("methods.ike", "load_ike_hparams"),
        compute=_lazy("methods.ike", "compute_ike"),
        description="in-context editing: retrieved facts with demonstrations in the chat",
        payload="memory",
        drains=False,
    ),
    "ice": MethodSpec(
        name="ice",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=64,
        load_hparams=_lazy("methods.ike", "load_ice_hparams"),
        compute=_lazy("methods.ike", "compute_ike"),
        description="in-context editing without demonstrations: retrieved facts in the chat",
        payload="memory",
        drains=False,
    ),
    "serac": MethodSpec(
        name="serac",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=64,
        load_hparams=_lazy("methods.serac", "load_serac_hparams"),
        compute=_lazy("methods.serac", "compute_serac"),
        description="scope classifier over an edit memory; in scope, the model conditioned "
        "on the edit answers",
        payload="memory",
        drains=False,
    ),
    "grace": MethodSpec(
        name="grace",
        kinds=frozenset({"insert", "modify", "erase"}),
        max_requests=8,
        load_hparams=_lazy("methods.grace", "load_grace_hparams"),
        compute=_lazy("methods.grace", "compute_grace"),
        description="key/value codebook at one down-projection, with a deferral radius",
        payload="memory",
    ),
}
