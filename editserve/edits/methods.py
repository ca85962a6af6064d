"""The editing methods this server offers: each `methods/` module declares its own `SPEC`
(`methods.spec.MethodSpec`); this registry only collects them, by name."""

from __future__ import annotations

from methods import alphaedit, ft, grace, ike, memit, rome, serac
from methods.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        rome.SPEC,
        memit.SPEC,
        alphaedit.SPEC,
        ft.SPEC,
        ike.IKE_SPEC,
        ike.ICE_SPEC,
        serac.SPEC,
        grace.SPEC,
    )
}


def memory_store(method: str) -> str:
    """Where a memory method's entries live (`MethodSpec.memory_store`)."""
    store = METHODS[method].memory_store
    if store is None:
        raise KeyError(f"{method} is not a memory method")
    return store
