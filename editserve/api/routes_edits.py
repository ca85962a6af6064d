"""Edit routes: each calls one `EditService` method and shapes its record (`schemas`).
Guarded by the admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from editserve.api.deps import StateDep, limit_edit_rate, require_admin
from editserve.api.schemas import DryRunPublic, EditCreate, EditDeleted, EditList, EditPublic
from editserve.edits.outcomes import DryRun

router = APIRouter(prefix="/edits", dependencies=[Depends(require_admin)])


@router.post("", dependencies=[Depends(limit_edit_rate)])
async def create_edit(body: EditCreate, state: StateDep) -> EditPublic | DryRunPublic:
    made = await state.edits.create(
        body.method,
        body.kind,
        [r.as_dict() for r in body.requests],
        body.hparams,
        dry_run=body.dry_run,
        checks=body.checks,
        scope=body.scope,
    )
    if isinstance(made, DryRun):
        return DryRunPublic.model_validate(made)
    return EditPublic.model_validate(made)


@router.get("")
async def list_edits(state: StateDep) -> EditList:
    return EditList(data=[EditPublic.model_validate(r) for r in state.edits.list()])


@router.get("/{edit_id}")
async def get_edit(edit_id: str, state: StateDep) -> EditPublic:
    return EditPublic.model_validate(state.edits.get(edit_id))


@router.delete("/{edit_id}", dependencies=[Depends(limit_edit_rate)])
async def delete_edit(edit_id: str, state: StateDep, rebase: bool = False) -> EditDeleted:
    undone = await state.edits.undo(edit_id, rebase=rebase)
    return EditDeleted.model_validate(undone)
