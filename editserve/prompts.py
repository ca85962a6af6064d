"""The prompts the model is fed: one renderer for the chat route, edits and benchmarks.

A chat prompt is the model's chat template over the conversation with the generation prompt (the
assistant header) added, so the answer starts right after it. Memory edits (IKE, ICE, SERAC)
first condition the conversation on the facts retrieved for it (`MemoryEdits.render`), within
what the context window leaves for the answer. The chat route feeds this prompt; edit methods
optimise their targets after a question's prompt (`methods.base.EditContext.chat_prompt`); an
edit's checks and dry runs answer on the served prompt; benchmarks find where the server's answer
starts. Rendering in one place keeps the four from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from editserve.edits.memory_edits import MemoryEdits

Messages = list[dict[str, str]]
# A memory lookup: the entries relevant to a conversation (`MemoryEdits.retrieve`, or a dry
# run's preview that also searches an edit not registered).
Retrieve = Callable[[Messages], list[dict[str, Any]]]


class PromptError(ValueError):
    """A conversation this model cannot render as a chat prompt: bad input."""


def user_turn(question: str) -> Messages:
    return [{"role": "user", "content": question}]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """The chat template's token ids for `messages`, assistant header included."""
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as exc:  # the template's own checks (role order, ...) raise here
        raise PromptError(f"the messages do not fit the model's chat template: {exc}") from exc
    return list(ids)


def question_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """One user question's chat prompt, no memory edits in it."""
    return render_chat(tokenizer, user_turn(question))


def question_text(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """`question_prompt` as text: for /v1/completions calls, which tokenize it again."""
    return str(
        tokenizer.apply_chat_template(
            user_turn(question), add_generation_prompt=True, tokenize=False
        )
    )


@dataclass(frozen=True)
class ServedPrompt:
    ids: list[int]
    memory_edits: list[str]  # the memory edits whose facts it holds, each once, in prompt order


class PromptRenderer:
    """The prompts of one served model: its chat template and its edit memory (if any)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_model_len: int,
        memory: MemoryEdits | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.memory = memory

    def require_template(self) -> None:
        if not self.tokenizer.chat_template:
            raise PromptError(
                "this model has no chat template; use /v1/completions with a plain prompt"
            )

    def question_prompt(self, question: str) -> list[int]:
        """What edits are optimised after: a question's chat prompt, no memory edits in it."""
        return question_prompt(self.tokenizer, question)

    def retrieves(self) -> bool:
        """Whether a chat needs a memory lookup: some IKE, ICE or SERAC entry exists."""
        return self.memory is not None and self.memory.has_prompt_entries()

    def retrieve(self, messages: Messages) -> list[dict[str, Any]]:
        return self.memory.retrieve(messages) if self.memory is not None else []

    def conditioned(
        self, messages: Messages, used: list[dict[str, Any]], answer_tokens: int
    ) -> ServedPrompt:
        """The prompt for `messages` conditioned on the retrieved entries `used`, leaving
        `answer_tokens` of the context window for the answer (facts are dropped, not the
        conversation, when they do not fit)."""
        template = partial(render_chat, self.tokenizer)
        if self.memory is None:
            return ServedPrompt(template(messages), [])
        budget = self.max_model_len - answer_tokens
        ids, held = self.memory.render(messages, used, template, budget)
        return ServedPrompt(ids, list(dict.fromkeys(u["edit_id"] for u in held)))

    def served_question(
        self, question: str, answer_tokens: int, retrieve: Retrieve | None = None
    ) -> list[int]:
        """What the chat route feeds for a one-question chat answered in `answer_tokens`:
        memory edits included, looked up by `retrieve` (default: the live memory's)."""
        messages = user_turn(question)
        used = (retrieve or self.retrieve)(messages)
        return self.conditioned(messages, used, answer_tokens).ids
