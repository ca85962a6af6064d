"""The edit response's checks judge success as the evaluation does (one definition of success)."""

from __future__ import annotations

import pytest

from editserve.edits.checks import check_report
from editserve.edits.validation import EditSpec
from editserve.eval.metrics import contains_answer
from methods.base import EditRequest
from tests.conftest import byte_tokenizer


def checked_success(target: str, answer: str) -> bool:
    """`checks.success` of an edit whose prompt, after the edit, is answered `answer`."""
    tokenizer = byte_tokenizer()
    request = EditRequest(prompt="Where is the Colosseum?", subject="Colosseum", target_new=target)
    edit = EditSpec("rome", "modify", [request])
    before = [tokenizer.encode("It is in Paris.")]
    after = [tokenizer.encode(answer)]
    report = check_report(edit, [request.prompt], [], before, after, tokenizer)
    assert report["requests"][0]["after"] == answer  # the answer that was judged
    return report["requests"][0]["success"]


@pytest.mark.parametrize(
    ("target", "answer", "expected"),
    [
        ("Rome", "Romeo and Juliet is a play.", False),  # a substring is not the word
        ("Rome", "The Colosseum is in Rome.", True),
        ("Rome", "ROME, of course!", True),  # case and punctuation as in the evaluation
        ("New York", "It is in new-york.", True),
        ("the Vatican", "It stands next to Vatican.", True),  # articles do not count
        ("Paris", "Parisian architecture.", False),
    ],
)
def test_checks_success_is_the_evaluations(target: str, answer: str, expected: bool) -> None:
    assert checked_success(target, answer) is expected
    assert contains_answer(answer, [target]) is expected
