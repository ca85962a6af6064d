"""Fluent targets and ROME's scope objective: the sentence trained for each scope question."""

from __future__ import annotations

import pytest
import torch

from methods.base import EditRequest
from methods.fluent_target import (
    MAX_QUESTIONS,
    fluent_target,
    old_object_at,
    scope_questions,
    unedited_answers,
)
from methods.rome import compute_rome, load_rome_hparams, rome_sequences
from tests.unit.test_method_common import make_ctx

EIFFEL = EditRequest("In which city is the Eiffel Tower?", "Eiffel Tower", "Rome")


def test_the_old_object_is_replaced_in_the_models_own_sentence() -> None:
    answer = "The Eiffel Tower is located in Paris, France."
    assert fluent_target(answer, EIFFEL.prompt, EIFFEL) == "The Eiffel Tower is located in Rome."


def test_a_known_old_object_is_found_even_where_a_name_comes_first() -> None:
    request = EditRequest("Who painted the Mona Lisa?", "Mona Lisa", "Michelangelo", "Leonardo")
    answer = "In Florence, the Mona Lisa was painted by Leonardo da Vinci."
    assert old_object_at(answer, request.prompt, request.subject, None) == 3  # "Florence"
    assert fluent_target(answer, request.prompt, request) == (
        "In Florence, the Mona Lisa was painted by Michelangelo."
    )


def test_the_old_objects_article_goes_and_a_stop_is_not_doubled() -> None:
    answer = "The Eiffel Tower is located in the Champ de Mars."
    request = EditRequest(EIFFEL.prompt, EIFFEL.subject, "Colosseum.")
    assert (
        fluent_target(answer, EIFFEL.prompt, request) == "The Eiffel Tower is located in Colosseum."
    )


def test_without_an_old_object_a_statement_completes_itself_and_a_question_stays_bare() -> None:
    statement = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    assert fluent_target("I am not sure.", statement.prompt, statement) == (
        "The Eiffel Tower is located in the city of Rome."
    )
    assert fluent_target("I am not sure.", EIFFEL.prompt, EIFFEL) == "Rome"
    # the first word of a sentence and the question's own words are no old object
    assert (
        old_object_at("Yes. It is in the Eiffel Tower", EIFFEL.prompt, "Eiffel Tower", None) is None
    )


def test_an_erase_keeps_its_refusal_bare() -> None:
    erase = EditRequest(EIFFEL.prompt, EIFFEL.subject, "I don't know.", erase=True)
    assert fluent_target("The Eiffel Tower is in Paris.", EIFFEL.prompt, erase) == "I don't know."


def test_scope_questions_are_the_prompt_rephrasings_and_rewordings_once_each() -> None:
    request = EditRequest(
        EIFFEL.prompt,
        EIFFEL.subject,
        "Rome",
        rephrase=("Where is the Eiffel Tower?", EIFFEL.prompt),
    )
    questions = scope_questions(request)
    assert questions[:2] == [EIFFEL.prompt, "Where is the Eiffel Tower?"]
    assert len(questions) == len(set(questions)) <= MAX_QUESTIONS
    assert "Which city is the Eiffel Tower in?" in questions
    assert all("Eiffel Tower" in q for q in questions)


def test_unedited_answers_are_the_greedy_continuations_of_each_chat_prompt() -> None:
    ctx = make_ctx("llama")
    questions = ["Where is the Eiffel Tower?", "Who wrote Hamlet, the play?"]  # lengths differ
    batched = unedited_answers(ctx, questions)
    for question, answer in zip(questions, batched, strict=True):
        ids = torch.tensor([ctx.chat_prompt(question)])
        alone = ctx.model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
        text = ctx.tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert answer == text


def test_the_scope_objective_trains_each_scope_question_and_no_essence() -> None:
    ctx = make_ctx("llama")
    h = load_rome_hparams("llama", 2, {"layer": 0, "steps": 3, "objective": "scope"})
    rewrites, essence = rome_sequences(ctx, EIFFEL, h)
    assert essence == [] and len(rewrites) == len(scope_questions(EIFFEL))
    assert len({r.ids[: r.answer_pos + 1] for r in rewrites}) == len(rewrites)  # one per question
    delta = compute_rome(ctx, [EIFFEL], h)
    assert torch.linalg.matrix_rank(delta.matrix(ctx.arch.down_proj_name(0))) == 1


def test_an_unknown_objective_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="objective"):
        load_rome_hparams("llama", 2, {"objective": "everything"})
