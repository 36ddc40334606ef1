"""Scoring one answer, as lmms-eval 0.7.3 scores it (torch-free).

Every function here reproduces the behaviour of the lmms-eval release named in its docstring, quirks
included, so that a tinyvlm score equals the one lmms-eval would print for the same answers. The tests
check each against hand-derived values and, where lmms-eval is installed, against its own functions.

* `extract_choice` / `choice_score`: MMStar's multiple-choice letter (``tasks/_task_utils/mcq_extract.py``).
* `vqa_normalize` / `vqa_accuracy`: VQAv2's soft accuracy with the EvalAI answer normalisation
  (``tasks/_task_utils/vqa_eval_metric.py``, ``tasks/vqav2/utils.py``).
* `relaxed_correctness`: ChartQA's relaxed accuracy (``tasks/chartqa/utils.py``).
"""

from __future__ import annotations

import re
import statistics
from typing import Sequence

# ------------------------------------------------------------------------------- multiple choice (MMStar)

#: Phrases after which the first choice letter counts as the answer ("The answer is B").
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip

#: How much a way of writing the letter is trusted; among the candidates of the most trusted way, the last
#: one in the answer wins. ``fallback`` (the letter anywhere) counts only when nothing else matched.
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}  # fmt: skip

#: Characters stripped from both ends of the answer, one after the other in this order.
_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'", '"')

#: ``pattern`` with the letter in place of ``{}`` -> its name in `_PRIORITY`.
_WRITTEN_FORMS = (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                  ("{} ", "space"))  # fmt: skip


def extract_choice(response: str, choices: Sequence[str] = ("A", "B", "C", "D")) -> str:
    """The choice letter an answer gives ("" when it gives none), lmms-eval 0.7.3's ``extract_mcq_answer``.

    Letters are matched in upper case only (an answer "b" gives ""). Candidates are collected in each
    way of writing a letter: alone at the start or at the end (not followed / preceded by another
    letter), after an answer phrase (`ANSWER_PHRASES`; the first letter found after the phrase's first
    occurrence, even inside a word), ``(B)``, ``B.``, ``B:``, ``B)``, ``B`` + space; the letter anywhere only
    when nothing else matched. The most trusted way wins, and within it the last occurrence.
    """
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in _EDGE_PUNCTUATION:
        text = text.strip(char)
    padded = f" {text} "
    candidates: list[tuple[int, int, str]] = []  # (priority, position, letter)

    def add(letter: str, position: int, form: str) -> None:
        candidates.append((_PRIORITY[form], position, letter))

    for pattern, form in _WRITTEN_FORMS:
        for letter in choices:
            written = pattern.format(letter)
            if written in padded:
                add(letter, padded.rfind(written), form)
    lowered = padded.lower()
    for phrase in ANSWER_PHRASES:
        start = lowered.find(phrase)
        if start != -1:
            for letter in choices:
                found = padded.find(letter, start + len(phrase))
                if found != -1:
                    add(letter, found, "phrase")
    bare = padded.strip()
    for letter in choices:
        if bare.startswith(letter) and (len(bare) == 1 or not bare[1].isalpha()):
            add(letter, 0, "start")
        if bare.endswith(letter) and (len(bare) == 1 or not bare[-2].isalpha()):
            add(letter, len(padded) - 1, "end")
    if not candidates:
        for letter in choices:
            if letter in padded:
                add(letter, padded.rfind(letter), "fallback")
    if not candidates:
        return ""
    # The most trusted form first, then the latest position; a stable sort keeps the first found on ties.
    return sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True)[0][2]


def choice_score(prediction: str, answer: str, choices: Sequence[str] = ("A", "B", "C", "D")) -> float:
    """1.0 when the letter extracted from ``prediction`` is the reference letter (stripped, upper-cased)."""
    return 1.0 if extract_choice(prediction, choices) == answer.strip().upper() else 0.0


# ---------------------------------------------------------------------------------------------- VQAv2

#: EvalAI's contraction fixes (the VQA evaluator's list). Keys with capitals ("Im", "Ive") never match,
#: since words are lower-cased before the lookup; they are kept because the reference keeps them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
#: Number words become digits ("none" too, as in the reference).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
#: Removed, or replaced by a space (see `_vqa_punctuation`). The period has its own rule.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
#: The reference passes ``re.UNICODE`` (32) where ``Pattern.sub`` takes its ``count``: at most 32 periods go.
_PERIODS_REMOVED = 32


def _vqa_punctuation(text: str) -> str:
    """Each `PUNCTUATION` mark is deleted when it touches a space somewhere in ``text`` (or when the text
    has a digit-comma-digit, "1,000"), else replaced by a space; then periods not followed by a digit go."""
    deleting_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or deleting_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIODS_REMOVED)


def _vqa_words(text: str) -> str:
    """Lower-cased words, number words as digits, articles dropped, contractions fixed."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_normalize(answer: str) -> str:
    """An answer as lmms-eval's ``vqav2_process_results`` compares it: newlines and tabs as spaces, stripped,
    then EvalAI's punctuation rule and its digit / article / contraction rule (unlike the official
    ``vqaEval.py``, always, not only when the humans' answers differ)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_words(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy: for each of the human answers, min(1, (how many of the *other* humans gave the
    prediction) / 3), averaged over the humans (with 10 answers: the mean over the 10 subsets of 9). All
    answers are normalised with `vqa_normalize`."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    predicted = vqa_normalize(prediction)
    humans = [vqa_normalize(answer) for answer in answers]
    matches = sum(human == predicted for human in humans)
    # Leaving human i out: the others that match are all matches but i's own.
    return statistics.mean(min(1.0, (matches - (human == predicted)) / 3) for human in humans)


# -------------------------------------------------------------------------------------------- ChartQA


def _chart_number(text: str) -> float | None:
    """Python's ``float`` of the text ("12", "1e3", " -4.5 "), with a trailing ``%`` (all of them) dividing
    by 100; None when it is not a number."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: when both are numbers and the target is not 0, right if the relative
    error is at most 5 %; otherwise a case-insensitive exact match of the strings."""
    predicted, expected = _chart_number(prediction), _chart_number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()
