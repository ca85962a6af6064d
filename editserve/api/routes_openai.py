"""OpenAI-compatible routes: each one calls one `OpenAIServing` method."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from editserve.api.deps import StateDep, require_api_key
from editserve.api.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models")
async def list_models(state: StateDep) -> dict:
    return {"object": "list", "data": [state.serving.model_card()]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, state: StateDep) -> dict:
    state.serving.check_model(model_id)
    return state.serving.model_card()


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep
) -> Response:
    return await state.serving.chat(body, request)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    return await state.serving.completion(body, request)
