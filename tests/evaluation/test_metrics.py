"""Scoring one answer: hand-derived expectations for every metric and its edge cases, and (where lmms-eval
is installed: the ``eval`` extra) equality with lmms-eval 0.7.3's own functions on a corpus of answers."""

from __future__ import annotations

import itertools

import pytest

from tinyvlm.evaluation.metrics import (
    choice_score,
    extract_choice,
    relaxed_correctness,
    vqa_accuracy,
    vqa_normalize,
)

# ------------------------------------------------------------------------------------------ MMStar letters

LETTERS = [
    # (answer, letter): why
    ("B", "B"),  # alone: start and end
    ("(B)", "B"),  # parentheses beat the ")" form
    ("The answer is (B).", "B"),  # the trailing "." is stripped; the letter after "the answer is"
    ("D.", "D"),
    ("Option B: the red one", "B"),  # "B:" (colon); no letter at the start or end
    ("b", ""),  # letters are matched in upper case only
    ("(c)", ""),
    ("a cat", ""),  # no upper-case choice letter anywhere
    ("E", ""),  # not a choice
    ("", ""),
    (" \n ", ""),
    ("Apple", "A"),  # "A" starts a word, so only the fallback (anywhere) finds it
    ("A and C", "A"),  # several letters: start (10) beats end (9)
    ("I think it is C, not D", "D"),  # end beats "C" (no form: "C," is none of them)
    ("The answer is C because A is wrong", "A"),  # phrase: both follow it, the later one wins
    ("A. B. C.", "A"),  # start beats period and end
    ("BD", "D"),  # "D " is the only form (both letters touch another letter)
    ('"C"', "C"),  # quotes are stripped from the ends
    ("I choose D", "D"),
]


@pytest.mark.parametrize(("answer", "letter"), LETTERS)
def test_extract_choice(answer: str, letter: str) -> None:
    assert extract_choice(answer) == letter


def test_choice_score_compares_with_the_reference_letter() -> None:
    assert choice_score("The answer is (B).", " b ") == 1.0  # the reference is stripped and upper-cased
    assert choice_score("b", "B") == 0.0  # a lower-case answer letter is not extracted
    assert choice_score("A and C", "C") == 0.0
    assert choice_score("E", "E", choices=("A", "B", "C", "D", "E")) == 1.0


# ------------------------------------------------------------------------------------------------- VQAv2

NORMALISED = [
    ("Two", "2"),  # number words, lower case
    ("none", "0"),
    ("ten", "10"),
    ("the dog.", "dog"),  # articles; a period not before a digit
    ("An apple", "apple"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("2.", "2"),
    ("a red-white flag", "red white flag"),  # "-" touching no space: a space
    ("e-mail - spam", "email spam"),  # "-" touches a space somewhere: deleted everywhere
    ("yes, it is", "yes it is"),
    ("1,000", "1000"),  # digit-comma-digit: every mark deleted
    ("1,000-2,000", "10002000"),
    ("5-10", "5 10"),
    ("(2)", "2"),
    ("10%", "10%"),  # "%" is not a mark the rule knows
    ("$5", "$5"),
    ("Hi!", "hi"),
    ("\tyes\n", "yes"),
    ("dont", "don't"),  # contractions
    ("Dont", "don't"),
    ("isnt it", "isn't it"),
    ("Im", "im"),  # the map's key is "Im", never met after lower-casing
    ("It's red", "it's red"),  # the apostrophe is not a mark
    ("." * 33, "."),  # the reference removes at most 32 periods
]


@pytest.mark.parametrize(("answer", "normalised"), NORMALISED)
def test_vqa_normalize(answer: str, normalised: str) -> None:
    assert vqa_normalize(answer) == normalised


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_mean_over_leave_one_out_subsets(matches: int, expected: float) -> None:
    """With k of 10 humans giving the answer: k humans see k-1 matches among the others, 10-k see k, each
    min(1, n/3): 0, 3/10, 6/10, 9/10, then 1."""
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides() -> None:
    answers = ["2", "two", "2.", "Two", "3", "3", "3", "3", "3", "3"]  # 4 of 10 say 2
    assert vqa_accuracy("The two", answers) == 1.0
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("three!", answers) == 1.0  # "!" becomes a space
    assert vqa_accuracy("four", answers) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("2", [])


# ------------------------------------------------------------------------------------------------ ChartQA

RELAXED = [
    ("12", "12.5", True),  # 0.5 / 12.5 = 4 %
    ("11.8", "12.5", False),  # 5.6 %
    ("105", "100", True),  # exactly 5 %
    ("95", "100", True),
    ("105.1", "100", False),
    ("50%", "0.5", True),  # a trailing % divides by 100
    ("50", "50%", False),
    ("-3", "-3.1", True),  # negative numbers: |difference| / |target|
    ("3", "-3", False),
    ("0", "0", True),  # target 0: no tolerance, string equality
    ("0.0", "0", False),
    ("1e2", "100", True),  # Python's float
    ("1,000", "1000", False),  # not a float: case-insensitive string equality
    ("Yes", "yes", True),
    ("yes.", "yes", False),
]


@pytest.mark.parametrize(("prediction", "target", "right"), RELAXED)
def test_relaxed_correctness(prediction: str, target: str, right: bool) -> None:
    assert relaxed_correctness(prediction, target) is right


# ------------------------------------------------------------------------- equality with lmms-eval itself


def _answer_corpus() -> list[str]:
    """Hand cases plus combinations of the pieces answers are made of."""
    pieces = ["A", "B", "c", "D.", "(B)", "the answer is", "Answer:", "option", "two", "1,000", "3.5", "-",
              ",", "!", "dont", "an", "Apple", "  ", "\n", "%", "50", "C)", "选"]
    combos = [" ".join(c) for c in itertools.product(pieces, repeat=2)]
    combos += ["".join(c) for c in itertools.permutations(pieces[:8], 3)]
    return [a for a, _ in LETTERS] + [a for a, _ in NORMALISED] + [p for p, _, _ in RELAXED] + combos


def test_extract_choice_equals_lmms_eval() -> None:
    mcq = pytest.importorskip("lmms_eval.tasks._task_utils.mcq_extract", reason="lmms-eval (the eval extra)")
    for answer in _answer_corpus():
        assert extract_choice(answer) == mcq.extract_mcq_answer(answer, choices=["A", "B", "C", "D"]), answer


def test_vqa_scores_equal_lmms_eval() -> None:
    vqav2 = pytest.importorskip("lmms_eval.tasks.vqav2.utils", reason="lmms-eval (the eval extra)")
    corpus = _answer_corpus()
    for i, prediction in enumerate(corpus):
        humans = [corpus[(i * 7 + j * 13) % len(corpus)] for j in range(6)] + [prediction.upper()] * 2 + ["2", "two"]
        doc = {"question_id": i, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                             for j, a in enumerate(humans)]}
        expected = vqav2.vqav2_process_results(doc, [prediction.strip()])["exact_match"]
        assert vqa_accuracy(prediction.strip(), humans) == pytest.approx(expected, abs=1e-12), prediction


def test_relaxed_correctness_equals_lmms_eval() -> None:
    chartqa = pytest.importorskip("lmms_eval.tasks.chartqa.utils", reason="lmms-eval (the eval extra)")
    numbers = ["12", "12.5", "-3", "0", "0.0", "50%", "0.5", "1e2", "100", "nan", "inf", "1_000", "Yes", "yes"]
    for prediction, target in itertools.product(numbers + _answer_corpus()[:40], numbers):
        assert relaxed_correctness(prediction, target) == chartqa.relaxed_correctness(prediction, target), (prediction, target)
