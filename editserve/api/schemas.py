"""Wire models of the OpenAI-compatible routes. Requests convert themselves to engine types."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from editserve.edits.methods import METHODS
from editserve.engine.sampling import SamplingParams
from methods.spec import EditKind, Scope

# Each paraphrase and locality probe of an edit request is answered before and after the edit
# (two greedy generations each, under the edit lock): bounded so one request can't hold it long.
MAX_REPHRASE = 16
MAX_LOCALITY = 16
MAX_PROBE_CHARS = 2000  # as the service bounds an edit's prompt (MAX_PROMPT_CHARS)
# Prompts per /v1/completions call: the most any server admits at once (max_batch is at most
# 256); the server's own max_batch bounds prompts x n (serving.py).
MAX_PROMPTS = 256


class APIModel(BaseModel):
    # Unknown fields are accepted (clients send vendor extras) and ignored.
    model_config = ConfigDict(extra="ignore")


class TextPart(APIModel):
    type: Literal["text"]
    text: str


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(APIModel):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=16)] | None


class _SamplingFields(APIModel):
    model: str = Field(description="the served model's id, as /v1/models lists it")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, description="not supported: must be 0")
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this server; send 0 or leave it out")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(
        self,
        max_tokens: int,
        choice: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        # n > 1 with a seed: each choice gets its own, still reproducible, stream.
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            stop=self.stops(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(
        16, ge=0, description="0 only with echo: score the prompt without generating"
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        return None

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported; use n for several choices")
        return best_of

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt list is empty")
        several = isinstance(prompt, list) and not isinstance(prompt[0], int)  # not one id list
        if several and len(prompt) > MAX_PROMPTS:
            raise PydanticCustomError(
                "too_many_prompts",
                "at most {limit} prompts per call, not {count}",
                {"limit": MAX_PROMPTS, "count": len(prompt)},
            )
        return prompt


# -- edits ----------------------------------------------------------------------------------------

OneOrMany = str | list[str] | None


class EditRequestIn(APIModel):
    prompt: str = Field(description="a question or statement that contains the subject verbatim")
    subject: str = Field(description="whose fact changes, e.g. 'Eiffel Tower'")
    target_new: str | None = Field(None, description="the new answer; erase defaults to a refusal")
    target_true: str | None = Field(None, description="the current answer, for the record")
    rephrase: OneOrMany = Field(
        None, description=f"paraphrases to check the edit on (at most {MAX_REPHRASE})"
    )
    locality: OneOrMany = Field(
        None,
        description=f"unrelated prompts whose answers must not move (at most {MAX_LOCALITY})",
    )

    @field_validator("rephrase", "locality")
    @classmethod
    def _bounded(cls, value: OneOrMany, info: ValidationInfo) -> OneOrMany:
        items = [value] if isinstance(value, str) else list(value or [])
        limit, what = {
            "rephrase": (MAX_REPHRASE, "paraphrases"),
            "locality": (MAX_LOCALITY, "locality prompts"),
        }[info.field_name or ""]
        if len(items) > limit:
            raise PydanticCustomError(
                "too_many_probes",
                "at most {limit} {what} per request (each is answered before and after the "
                "edit), not {count}",
                {"limit": limit, "what": what, "count": len(items)},
            )
        if any(len(item) > MAX_PROBE_CHARS for item in items):
            raise PydanticCustomError(
                "probe_too_long",
                "each of the {what} may have at most {limit} characters",
                {"what": what, "limit": MAX_PROBE_CHARS},
            )
        return value

    def as_dict(self) -> dict:
        def many(value: OneOrMany) -> list[str]:
            return [value] if isinstance(value, str) else list(value or [])

        return {
            **self.model_dump(),
            "rephrase": many(self.rephrase),
            "locality": many(self.locality),
        }


class EditCreate(APIModel):
    method: str = Field(description=f"one of {', '.join(METHODS)}")
    kind: EditKind = "modify"
    requests: list[EditRequestIn] = Field(min_length=1)
    hparams: dict[str, Any] | None = Field(None, description="overrides of the method's defaults")
    dry_run: bool = Field(False, description="compute and check without applying or journaling")
    checks: bool = Field(True, description="answer the prompts and probes before and after")
    scope: Scope | None = Field(
        None,
        description="'global': every request; 'question': only requests within the edit's "
        "scope (rome, memit, alphaedit). Default: the method's",
    )


class _LeavesOutAbsent(APIModel):
    """A response whose fields in ABSENT_WHEN_NONE are left out of the JSON when None."""

    ABSENT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.ABSENT_WHEN_NONE}


class EditPublic(_LeavesOutAbsent):
    """An edit, as GET /edits/{id} (and the POST that made it) answer."""

    ABSENT_WHEN_NONE = frozenset({"error", "checks", "timings", "memory", "dry_run", "delta"})
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["edit"] = "edit"
    method: str
    kind: str
    scope: str = Field("global", description="global, or question: only requests in its scope")
    status: str = Field(description="applied, undone, or not_replayed (see error)")
    error: str | None = Field(None, description="why a journaled edit was not replayed")
    created_at: float | None
    applied_at: float | None
    undone_at: float | None
    model_version: int | None = Field(description="the model version its commit made")
    requests: list[dict[str, Any]]
    hparams: dict[str, Any]
    resolved_hparams: Any
    checks: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    memory: dict[str, Any] | None = None
    dry_run: bool | None = None
    delta: dict[str, Any] | None = None


class DryRunPublic(_LeavesOutAbsent):
    """A dry run's answer: the edit computed and checked, neither applied nor journaled."""

    ABSENT_WHEN_NONE = frozenset({"memory", "delta"})
    model_config = ConfigDict(from_attributes=True)

    id: None = None
    object: Literal["edit"] = "edit"
    status: Literal["dry_run"] = "dry_run"
    method: str
    kind: str
    scope: str = "global"
    requests: list[dict[str, Any]]
    hparams: dict[str, Any]
    probes: list[str]
    resolved_hparams: Any
    memory: dict[str, Any] | None = None
    model_version: int
    checks: dict[str, Any]
    timings: dict[str, float]
    dry_run: Literal[True] = True
    delta: dict[str, Any] | None = None


class EditList(APIModel):
    object: Literal["list"] = "list"
    data: list[EditPublic]


class EditDeleted(_LeavesOutAbsent):
    ABSENT_WHEN_NONE = frozenset({"rebase_error"})
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["edit.deleted"] = "edit.deleted"
    deleted: Literal[True] = True
    model_version: int
    later_edits: list[str] = Field(description="edits committed after it and still applied")
    rebased: list[str] = Field(description="of those, the weight edits recomputed")
    rebase_error: str | None = Field(
        None, description="a failed rebase: the undo held, the later edits kept their deltas"
    )
    timings: dict[str, float]
