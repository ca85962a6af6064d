"""An edit request checked before anything is computed: method, kind, each request's fields
and hyperparameters. What is wrong is said in an `InvalidEdit` naming the field; a method
this install cannot run is a `MethodUnavailable`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from editserve.edits.errors import InvalidEdit, MethodUnavailable
from editserve.edits.methods import METHODS
from methods.base import EditRequest
from methods.spec import EDIT_KINDS, SCOPES, MethodSpec

ERASE_TARGET = "I don't know."
# A sentence or two: KnowEdit's WikiBio corrections run to 102 tokens (21 of its first 100 are
# over 48); longer targets belong in a document, not in one fact.
MAX_TARGET_TOKENS = 128
MAX_PROMPT_CHARS = 2000


@dataclass
class EditSpec:
    """A validated edit request."""

    method: str
    kind: str
    requests: list[EditRequest]
    hparams: dict[str, Any] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)
    scope: str = "global"

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "kind": self.kind,
            "scope": self.scope,
            "requests": [asdict(r) for r in self.requests],
            "hparams": self.hparams,
            "probes": self.probes,
        }

    @classmethod
    def from_json(cls, data: dict) -> EditSpec:
        requests = [
            EditRequest(**{**r, "rephrase": tuple(r.get("rephrase", ()))}) for r in data["requests"]
        ]
        scope = data.get("scope", "global")  # journaled before scopes existed: global
        return cls(data["method"], data["kind"], requests, data["hparams"], data["probes"], scope)


@dataclass(frozen=True)
class EditValidator:
    """Checks edit requests against one served model."""

    tokenizer: Any
    model_type: str
    num_layers: int
    max_model_len: int
    chat_prompt: Callable[[str], list[int]]  # what methods train on (`EditContext.chat_prompt`)
    unavailable: Callable[[], Mapping[str, str]]  # methods this install can't run -> why
    encoder_unavailable: Callable[[], str | None]  # why scope decisions can't run, if so

    def resolve_hparams(
        self, spec: MethodSpec, overrides: dict | None, scope: str = "global"
    ) -> Any:
        start = spec.scoped_hparams if scope == "question" else {}
        return spec.load_hparams(self.model_type, self.num_layers, {**start, **(overrides or {})})

    def validate(
        self,
        method: str,
        kind: str,
        requests: list[dict],
        hparams: dict | None,
        scope: str | None = None,
    ) -> tuple[EditSpec, MethodSpec, Any]:
        spec = METHODS.get(method)
        if spec is None:
            known = ", ".join(sorted(METHODS))
            raise InvalidEdit(f"unknown method {method!r}; this server offers: {known}", "method")
        if why := self.unavailable().get(method):  # an optional package not installed
            raise MethodUnavailable(
                f"{method} edits are unavailable on this server: {why}", "method"
            )
        if kind not in EDIT_KINDS:
            raise InvalidEdit(f"kind must be one of {', '.join(EDIT_KINDS)}, not {kind!r}", "kind")
        if kind not in spec.kinds:
            raise InvalidEdit(f"{method} does not support {kind!r} edits", "kind")
        scope = self._scope(spec, scope)
        if not 1 <= len(requests) <= spec.max_requests:
            raise InvalidEdit(
                f"{method} takes 1 to {spec.max_requests} requests per edit, not {len(requests)}",
                "requests",
            )
        edit_requests, probes = [], []
        for i, raw in enumerate(requests):
            edit_requests.append(self._request(i, kind, raw))
            probes += raw.get("locality") or []
        try:
            resolved = self.resolve_hparams(spec, hparams, scope)
        except (ValueError, TypeError) as exc:
            raise InvalidEdit(f"hparams: {exc}", "hparams") from exc
        edit = EditSpec(method, kind, edit_requests, dict(hparams or {}), probes, scope)
        return edit, spec, resolved

    def _scope(self, spec: MethodSpec, scope: str | None) -> str:
        scope = spec.default_scope if scope is None else scope
        if scope not in SCOPES:
            raise InvalidEdit(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}", "scope")
        if scope not in spec.scopes:
            able = ", ".join(m for m, s in METHODS.items() if scope in s.scopes)
            why = (
                "its facts already reach only the requests they are retrieved for"
                if spec.payload == "memory"
                else "its delta is dense, and a dense delta cannot be added per request cheaply"
            )
            raise InvalidEdit(
                f"{spec.name} edits cannot have scope {scope!r}: {why}; use scope 'global', "
                f"or one of {able}",
                "scope",
            )
        if scope == "question" and (why := self.encoder_unavailable()):
            raise MethodUnavailable(f"scoped edits are unavailable on this server: {why}", "scope")
        return scope

    def _request(self, i: int, kind: str, raw: dict) -> EditRequest:
        where = f"requests.{i}"
        prompt, subject = raw["prompt"].strip(), raw["subject"].strip()
        if not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidEdit(
                f"the prompt must have 1 to {MAX_PROMPT_CHARS} characters", f"{where}.prompt"
            )
        if not subject or subject not in prompt:
            raise InvalidEdit(
                f"the subject {subject!r} must occur verbatim in the prompt {prompt!r}",
                f"{where}.subject",
            )
        target = (raw.get("target_new") or "").strip()
        if not target:
            if kind != "erase":
                raise InvalidEdit(
                    "target_new is required (and not blank) for this kind", f"{where}.target_new"
                )
            target = ERASE_TARGET
        target_tokens = len(self.tokenizer.encode(" " + target))
        if target_tokens > MAX_TARGET_TOKENS:
            raise InvalidEdit(
                f"target_new is {target_tokens} tokens long; the most is {MAX_TARGET_TOKENS}",
                f"{where}.target_new",
            )
        # The methods train on the chat prompt followed by the target: both must fit the model.
        prompt_tokens = len(self.chat_prompt(prompt))
        if prompt_tokens + target_tokens > self.max_model_len:
            raise InvalidEdit(
                f"the chat prompt ({prompt_tokens} tokens) and target_new ({target_tokens}) "
                f"do not fit the model's {self.max_model_len}-token context",
                f"{where}.prompt",
            )
        return EditRequest(
            prompt=prompt,
            subject=subject,
            target_new=target,
            target_true=raw.get("target_true"),
            rephrase=tuple(raw.get("rephrase") or ()),
            erase=kind == "erase",
        )
