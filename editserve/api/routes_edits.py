"""Edit routes: each calls one `EditService` method. Guarded by the admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from editserve.api.deps import StateDep, limit_edit_rate, require_admin
from editserve.api.schemas import EditCreate

router = APIRouter(prefix="/edits", dependencies=[Depends(require_admin)])


@router.post("", dependencies=[Depends(limit_edit_rate)])
async def create_edit(body: EditCreate, state: StateDep) -> dict:
    return await state.edits.create(
        body.method,
        body.kind,
        [r.as_dict() for r in body.requests],
        body.hparams,
        dry_run=body.dry_run,
        checks=body.checks,
    )


@router.get("")
async def list_edits(state: StateDep) -> dict:
    return {"object": "list", "data": state.edits.list()}


@router.get("/{edit_id}")
async def get_edit(edit_id: str, state: StateDep) -> dict:
    return state.edits.get(edit_id)


@router.delete("/{edit_id}", dependencies=[Depends(limit_edit_rate)])
async def delete_edit(edit_id: str, state: StateDep, rebase: bool = False) -> dict:
    return await state.edits.undo(edit_id, rebase=rebase)
