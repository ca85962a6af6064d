"""What a method is, declared by the method's own module: `SPEC = MethodSpec(...)` at its end.

The server's registry (`editserve.edits.methods`) only collects these. A spec says which edit
kinds a method supports, how many requests one edit may carry, how hyperparameters resolve
(defaults per model family plus a request's overrides; a ValueError says what is wrong) and how
the result is computed.

`payload` says what a method produces: "params", a `ParamDelta` (weights change, through the
ledger), computed as compute(ctx, requests, hparams); or "memory", a `MemoryPayload` (entries of
the edit memory or the GRACE codebook), computed as compute(ctx, memory_ctx, requests, hparams).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

EditKind = Literal["insert", "modify", "erase"]
EDIT_KINDS: tuple[str, ...] = get_args(EditKind)
ALL_KINDS = frozenset(EDIT_KINDS)
# "global": the edit reaches every request; "question": only the requests within its scope
# (the server decides per request; everything else runs on the unedited model).
Scope = Literal["global", "question"]
SCOPES: tuple[str, ...] = get_args(Scope)

# (model_type, num_layers, overrides) -> hyperparameters (a dataclass)
LoadHparams = Callable[[str, int, dict[str, Any] | None], Any]
Compute = Callable[..., Any]  # -> ParamDelta | MemoryPayload (see `payload`)
# Where a memory method's entries live: a FAISS edit memory ("ike", shared by IKE and ICE;
# "serac") or the GRACE layer codebook ("codebook").
MemoryStore = Literal["ike", "serac", "codebook"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kinds: frozenset[str]
    max_requests: int
    load_hparams: LoadHparams
    compute: Compute
    description: str
    payload: Literal["params", "memory"] = "params"
    # Applying it waits for in-flight requests (it changes what a running generation computes:
    # weights, a layer codebook). Prompt memory only changes what new requests are fed.
    drains: bool = True
    memory_store: MemoryStore | None = None  # memory methods only
    # Reads E[kkᵀ] of the pristine model (MEMIT, AlphaEdit): the server computes them at start.
    reads_second_moments: bool = False
    # The scopes it can honour (a low-rank weight delta can be added per request) and the one
    # an edit gets when it names none.
    scopes: frozenset[str] = frozenset({"global"})
    default_scope: str = "global"
    # Hyperparameters a scoped edit starts from (a request's own overrides come on top): a
    # delta that reaches only its scope can be trained on the scope, not against the world.
    scoped_hparams: Mapping[str, Any] = field(default_factory=dict)
