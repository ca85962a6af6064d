"""Shared steps of locate-then-edit methods (ROME now; MEMIT and AlphaEdit reuse them).

- locating the subject's last token inside the chat-formatted token sequence;
- a fixed list of context prefixes, so that a key generalises beyond one wording (fixed, not
  sampled: the same request must always give the same delta);
- keys: the input of `arch.down_proj(layer)` (forward pre-hook), the forward cut short after it;
- low-rank deltas that earlier requests of the same edit added, emulated with a forward hook
  (the weights are the live server's tensors: nothing here ever writes them).

The target-value optimisation lives in `methods.value_optimiser`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from methods.base import EditContext, EditRequest
from methods.workbench import added_weights, hooks

# Prefixes a question is also asked behind; "" (the bare question) is always first.
CONTEXT_PREFIXES: tuple[str, ...] = (
    "",
    "Quick question:",
    "I was reading about this earlier.",
    "Please answer briefly.",
    "Here is a trivia question.",
    "My friend asked me this.",
    "I need this for a quiz.",
    "Out of curiosity:",
    "Think carefully.",
    "Help me with this one.",
)

# The most optimisation steps an edit may ask for (`steps`): each is a forward and backward pass
# under the edit lock; the configs use 25-40 and converge in fewer.
MAX_STEPS = 500

# Questions about the subject itself whose answers the KL ("essence") term keeps in place.
ESSENCE_QUESTIONS: tuple[str, ...] = ("What is {}?", "Tell me about {}.")

# Unrelated chats whose keys tell the update what to leave alone (none is in an evaluation set).
NEUTRAL_QUESTIONS: tuple[str, ...] = (
    "How do I boil an egg?",
    "Who discovered penicillin?",
    "Recommend a good book to read.",
    "Why is the sky blue?",
    "What is a prime number?",
    "Describe a cat in two sentences.",
    "Which river flows through Vienna?",
    "When did the Roman Empire fall?",
    "What does a software engineer do?",
    "Name a famous novel by Leo Tolstoy.",
    "Where is Mount Kilimanjaro?",
    "Who composed the Four Seasons?",
)


def context_questions(prompt: str, n: int) -> list[str]:
    """The prompt alone, then behind the first n-1 non-empty prefixes."""
    if not 1 <= n <= len(CONTEXT_PREFIXES):
        raise ValueError(f"the number of contexts must be in 1..{len(CONTEXT_PREFIXES)}, not {n}")
    return [f"{p} {prompt}" if p else prompt for p in CONTEXT_PREFIXES[:n]]


# -- locating the subject ------------------------------------------------------------------------


def token_char_spans(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The text of `ids` and each token's character span in it.

    The tokenizer's offset mapping is used when re-encoding the decoded text gives back the same
    ids (the usual case); otherwise the spans come from decoding growing prefixes.
    """
    ids = list(ids)
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == ids:
            return text, [tuple(span) for span in enc["offset_mapping"]]
    spans, start = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False))
        spans.append((start, max(start, end)))
        start = max(start, end)
    return text, spans


def subject_last_index(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], question: str, subject: str
) -> int:
    """Index in `ids` (a chat-formatted `question`) of the token ending `subject`'s first
    occurrence in the question."""
    if not subject.strip():
        raise ValueError("the subject is empty")
    if subject not in question:
        raise ValueError(f"the subject {subject!r} does not occur verbatim in {question!r}")
    text, spans = token_char_spans(tokenizer, ids)
    start = text.rfind(question)  # the user turn comes after any system prompt
    if start >= 0:
        end = start + question.index(subject) + len(subject)
    else:  # the template rewrote the question (e.g. stripped it): fall back to the subject
        found = text.rfind(subject)
        if found < 0:
            raise ValueError(f"the subject {subject!r} is not in the chat-formatted prompt")
        end = found + len(subject)
    for i, (s, e) in enumerate(spans):
        if s < end <= e:
            return i
    raise ValueError(f"no token ends the subject {subject!r}")  # pragma: no cover


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """The answer's tokens as the model would emit them right after the assistant header."""
    ids = tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the target is empty")
    return list(ids)


@dataclass(frozen=True)
class ChatSequence:
    """A chat prompt, optionally followed by a teacher-forced answer.

    `ids` = chat prompt + answer[:-1]; the logits at `answer_pos + j` predict `answer[j]`.
    """

    ids: tuple[int, ...]
    subject_pos: int  # the subject's last token
    answer_pos: int  # the chat prompt's last token
    answer: tuple[int, ...] = ()


def chat_sequence(
    ctx: EditContext, question: str, subject: str, answer: Sequence[int] = ()
) -> ChatSequence:
    prompt = list(ctx.chat_prompt(question))
    pos = subject_last_index(ctx.tokenizer, prompt, question, subject)
    return ChatSequence(
        ids=tuple(prompt + list(answer[:-1])),
        subject_pos=pos,
        answer_pos=len(prompt) - 1,
        answer=tuple(answer),
    )


def edit_sequences(
    ctx: EditContext, request: EditRequest, n_contexts: int, n_essence: int
) -> tuple[list[ChatSequence], list[ChatSequence]]:
    """Rewriting sequences (the prompt in `n_contexts` contexts, then the target) and the first
    `n_essence` essence questions about the subject (their first answer token is held in place
    by the KL term). ValueError on a subject missing from the prompt, or an empty target."""
    answer = target_ids(ctx.tokenizer, request.target_new)
    rewrites = [
        chat_sequence(ctx, question, request.subject, answer)
        for question in context_questions(request.prompt, n_contexts)
    ]
    essence = [
        chat_sequence(ctx, q.format(request.subject), request.subject)
        for q in ESSENCE_QUESTIONS[:n_essence]
    ]
    return rewrites, essence


def padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B]."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs])


def causal_mask(batch: int, width: int, device: torch.device) -> torch.Tensor:
    """[B, 1, T, T] boolean: with right padding, real tokens never see the pads after them."""
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return causal.expand(batch, 1, width, width)


# -- keys ------------------------------------------------------------------------------------------


class StopForward(Exception):
    """Raised by a hook to cut a forward pass short once it has what it needs."""


def first_input(inputs: tuple) -> torch.Tensor:
    return inputs[0]


def first_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """A module's hidden states, whether it returns them alone or first in a tuple (a block)."""
    return output[0] if isinstance(output, tuple) else output


def forward_until_stopped(ctx: EditContext, ids: torch.Tensor) -> None:
    """The workbench's transformer (no LM head) over right-padded `ids` [B, T], without grad,
    for the hooks registered on it to read; one raising `StopForward` ends the pass there."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            ctx.model.base_model(
                input_ids=ids, attention_mask=causal_mask(*ids.shape, ctx.device), use_cache=False
            )
    except StopForward:
        pass


def collect_keys(ctx: EditContext, layer: int, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Inputs of `down_proj(layer)` at every position: [B, T, d_in] (right-padded rows).

    The forward stops at that module, so later layers are never run.
    """
    return collect_layer_keys(ctx, [layer], seqs)[layer]


def collect_layer_keys(
    ctx: EditContext, layers: Sequence[int], seqs: Sequence[Sequence[int]]
) -> dict[int, torch.Tensor]:
    """Inputs of `down_proj(l)` at every position for each l in `layers`: {l: [B, T, d_in]}
    (right-padded rows), from one forward that stops at the last of them."""
    ids, _ = padded(seqs, pad=_pad_id(ctx))
    last = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def grab(layer: int):  # noqa: ANN202 (a torch hook)
        def hook(_: nn.Module, inputs: tuple) -> None:
            captured[layer] = first_input(inputs).detach()
            if layer == last:
                raise StopForward

        return hook

    with hooks(ctx.arch.down_proj(i).register_forward_pre_hook(grab(i)) for i in set(layers)):
        forward_until_stopped(ctx, ids.to(ctx.device))
    return captured


# -- deltas of earlier requests ------------------------------------------------------------------


def added_low_rank(
    ctx: EditContext, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> AbstractContextManager[None]:
    """Makes the workbench compute as if W + U @ V for each named weight, through forward hooks
    (U [out, r], V [r, in] in the parameter's own layout: `WeightLayout.stored_factors`)."""
    return added_weights(ctx.model, ctx.arch.layout, deltas)


def _pad_id(ctx: EditContext) -> int:
    pad = ctx.tokenizer.pad_token_id
    return pad if pad is not None else (ctx.tokenizer.eos_token_id or 0)
