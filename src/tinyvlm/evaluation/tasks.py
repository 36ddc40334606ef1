"""The built-in tasks: how a row of a benchmark becomes a prompt, how an answer is scored, how scores add up.

Each benchmark task reads the columns of the dataset as published and follows lmms-eval 0.7.3's task of the
same name (its YAML and ``utils.py``): the same prompt text (its ``default`` pre-prompt is empty for all
of them, so only the post-prompt is kept here), generation limit and stop strings, the same scoring and
aggregation, under lmms-eval's metric names. docs/evaluation.md lists them.

A prompt reaches the model as one user turn, its images before the text, rendered as tinyvlm renders
training conversations (the chat template, or the plain transcript of a base decoder).

Data is read by `tinyvlm.data`'s sources (the ones training reads: parquet files and folders, save_to_disk
folders, ``hf-dataset:`` streams, JSONL / JSON records), through `task_rows`.
"""

from __future__ import annotations

import abc
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

from tinyvlm.data.answers import normalize_answer
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.evaluation import metrics

if TYPE_CHECKING:
    from PIL import Image

    from tinyvlm.data import Record, Rows

#: lmms-eval's ``until`` when a task's ``generation_kwargs`` set none (``api/task.py``: its fewshot
#: delimiter).
DEFAULT_UNTIL = ("\n\n",)
#: The answer-length limit where a task sets none. lmms-eval leaves it to the model class: 1024 in most of
#: them, and in tinyvlm's plugin.
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class Sample:
    """One question: the prompt (chat messages), its images (PIL images or files), the reference answer, and
    the groups it counts in (``{"category": ..., "l2_category": ...}``)."""

    id: Any
    messages: list[dict[str, str]]
    images: list[Any]
    reference: Any
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The prompt's text, as the sample log shows it."""
        return "\n".join(m["content"] for m in self.messages)


Scored = Sequence[tuple[Sample, float]]


@dataclass
class Samples:
    """A task's samples, in stored order: ``name`` says where they come from (the source, and the split
    where one was chosen), ``length`` how many there are (None when unknown before reading)."""

    name: str
    items: Iterator[Sample]
    length: int | None


class Task(abc.ABC):
    """A task: where its data is (``source``, ``split``), the samples it makes of it, how an answer is scored,
    and how the scores add up (``metric`` is the headline)."""

    name: ClassVar[str]
    columns: ClassVar[str]
    source: ClassVar[str | None]
    split: ClassVar[str | None]
    metric: ClassVar[str]
    post_prompt: ClassVar[str]
    max_new_tokens: ClassVar[int]
    until: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def samples(self, source: str | None = None, split: str | None = None) -> Samples:
        """The samples of the task's data, or of ``source`` / ``split``, in stored order."""

    @abc.abstractmethod
    def score(self, prediction: str, reference: Any) -> float: ...

    @abc.abstractmethod
    def aggregate(self, scored: Scored) -> dict[str, float]: ...

    def answer(self, generated: str) -> str:
        """The generated text (which ends before the first ``until`` string: `VLM.generate`'s ``stop``) as
        lmms-eval scores it: stripped."""
        return generated.strip()

    def _source(self, source: str | None) -> str:
        if source is None and self.source is None:
            raise ConfigError(f"task {self.name!r} has no default data: give it with --data (data=...)")
        return source or self.source  # type: ignore[return-value]


def task_rows(source: str, split: str | None, *, default_split: str) -> "Rows":
    """The rows of ``split`` (None: ``default_split``) of a dataset source, read by `tinyvlm.data`. A parquet
    file holds one split (``datasets`` names it ``train``): it is read whole, and naming a split for it is a
    `ConfigError`."""
    from tinyvlm.data.readers import open_rows, parse_source

    spec = parse_source(source)
    if spec.is_records_file:
        raise DataError(f"{source}: a JSONL / JSON file holds training records; score them with the exact_match task")
    if spec.path is not None and spec.path.is_file():
        if split is not None:
            raise ConfigError(f"--split {split}: {source} is one file, one split; splits are chosen in folders and "
                              "hf-dataset: sources")
        split = "train"
    return open_rows(spec, split or default_split)


class BenchmarkTask(Task):
    """A benchmark in its published schema: each row of the split becomes a `Sample` (`sample`)."""

    split: ClassVar[str]

    def samples(self, source: str | None = None, split: str | None = None) -> Samples:
        from tinyvlm.data.records import open_image
        from tinyvlm.data.schemas import image_ref

        rows = task_rows(self._source(source), split, default_split=self.split)

        def build() -> Iterator[Sample]:
            for index, row in enumerate(rows.read()):
                where = f"{rows.name} row {index}"

                def image(value: Any) -> "Image.Image":
                    return open_image(image_ref(value, base=rows.base, where=where)).convert("RGB")

                try:
                    yield self.sample(row, index, image)
                except KeyError as error:
                    raise DataError(
                        f"{where}: no column {error}; {self.name} reads {self.columns} "
                        f"(the row has {', '.join(sorted(row)) or 'no columns'})"
                    ) from None

        return Samples(rows.name, build(), rows.length)

    @abc.abstractmethod
    def sample(self, row: dict[str, Any], index: int, image: Callable[[Any], "Image.Image"]) -> Sample:
        """Row ``index`` as a sample; ``image`` decodes one of its images (as lmms-eval's ``doc_to_visual``:
        RGB)."""


def _user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _group_means(scored: Scored, key: str) -> dict[str, float]:
    by_group: dict[str, list[float]] = defaultdict(list)
    for sample, score in scored:
        by_group[sample.groups[key]].append(score)
    return {group: _mean(values) for group, values in sorted(by_group.items())}


class MMStar(BenchmarkTask):
    name = "mmstar"
    columns = "index, question (options inline), image, answer (a letter), category, l2_category"
    source = "hf-dataset:Lin-Chen/MMStar"
    split = "val"
    metric = "average"
    post_prompt = "\nAnswer with the option's letter from the given choices directly"
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    until = DEFAULT_UNTIL
    #: Taken out of a question when a post-prompt is added (lmms-eval's ``replace_prompt``).
    yes_no = " Please answer yes or no."

    def sample(self, row: dict[str, Any], index: int, image: Callable[[Any], "Image.Image"]) -> Sample:
        question = row["question"].strip().replace(self.yes_no, "") + self.post_prompt
        return Sample(
            id=row["index"],
            messages=_user_turn(question),
            images=[image(row["image"])],
            reference=row["answer"],
            groups={"category": row["category"], "l2_category": row["l2_category"]},
        )

    def score(self, prediction: str, reference: str) -> float:
        return metrics.choice_score(prediction, reference)

    def aggregate(self, scored: Scored) -> dict[str, float]:
        """``average`` (the headline): the mean over l2 categories of their accuracy; each ``category`` the
        same over its own l2 categories (lmms-eval's metric per category); ``accuracy`` over all samples."""
        by_category: dict[str, list[tuple[Sample, float]]] = defaultdict(list)
        for sample, score in scored:
            by_category[sample.groups["category"]].append((sample, score))
        values = {"average": self._l2_macro(scored), "accuracy": _mean([s for _, s in scored])}
        values.update({name: self._l2_macro(members) for name, members in sorted(by_category.items())})
        return values

    @staticmethod
    def _l2_macro(scored: Scored) -> float:
        return _mean(list(_group_means(scored, "l2_category").values()))


class VQAv2(BenchmarkTask):
    name = "vqav2_val"
    columns = "question_id, question, answers (10 x {answer, answer_confidence, answer_id}), answer_type, image"
    source = "hf-dataset:lmms-lab-encoder/VQAv2"
    split = "validation"
    metric = "exact_match"
    post_prompt = "\nAnswer the question using a single word or phrase."
    max_new_tokens = 16
    until = DEFAULT_UNTIL

    def sample(self, row: dict[str, Any], index: int, image: Callable[[Any], "Image.Image"]) -> Sample:
        answers = row["answers"]
        if not answers:
            raise DataError(f"VQAv2 row {index}: no human answers to score against (the test split has none)")
        return Sample(
            id=row["question_id"],
            messages=_user_turn(row["question"] + self.post_prompt),
            images=[image(row["image"])],
            reference=[answer["answer"] for answer in answers],
            groups={"answer_type": row["answer_type"]},
        )

    def score(self, prediction: str, reference: list[str]) -> float:
        return metrics.vqa_accuracy(prediction, reference)

    def aggregate(self, scored: Scored) -> dict[str, float]:
        """``exact_match`` (lmms-eval's name for the soft accuracy, averaged over questions) and, as the
        official evaluator reports, the mean per ``answer_type``."""
        values = {"exact_match": _mean([s for _, s in scored])}
        values.update({f"answer_type/{k}": v for k, v in _group_means(scored, "answer_type").items()})
        return values


class ChartQA(BenchmarkTask):
    name = "chartqa"
    columns = "question, answer, type (human_test / augmented_test), image"
    source = "hf-dataset:lmms-lab-encoder/ChartQA"
    split = "test"
    metric = "relaxed_overall"
    post_prompt = "\nAnswer the question with a single word."
    max_new_tokens = 16
    until = DEFAULT_UNTIL

    def sample(self, row: dict[str, Any], index: int, image: Callable[[Any], "Image.Image"]) -> Sample:
        return Sample(
            id=index,
            messages=_user_turn(row["question"] + self.post_prompt),
            images=[image(row["image"])],
            reference=row["answer"],
            groups={"type": row["type"]},
        )

    def score(self, prediction: str, reference: str) -> float:
        return 1.0 if metrics.relaxed_correctness(prediction, reference) else 0.0

    def aggregate(self, scored: Scored) -> dict[str, float]:
        """``relaxed_overall``, ``relaxed_human_split`` (type ``human_test``) and ``relaxed_augmented_split``
        (every other type), the split ones when they have samples."""
        human = [s for sample, s in scored if sample.groups["type"] == "human_test"]
        augmented = [s for sample, s in scored if sample.groups["type"] != "human_test"]
        values = {"relaxed_overall": _mean([s for _, s in scored])}
        if human:
            values["relaxed_human_split"] = _mean(human)
        if augmented:
            values["relaxed_augmented_split"] = _mean(augmented)
        return values


class ExactMatch(Task):
    """The user's own data in tinyvlm's training format (any source training reads: a JSONL / JSON file of
    records, or a dataset in the_cauldron / FineVision / LLaVA / messages columns): the prompt is a record's
    conversation up to its last assistant turn, that turn is the reference, compared as training's held-out
    exact match compares."""

    name = "exact_match"
    columns = "tinyvlm's training records (JSONL / JSON) or a dataset in a training schema"
    source = None
    split = None  # a dataset's split: --split, else "train"
    metric = "exact_match"
    post_prompt = ""
    max_new_tokens = 32  # TrainConfig.max_new_tokens, as in training's held-out evaluation
    until = ()

    def samples(self, source: str | None = None, split: str | None = None) -> Samples:
        from tinyvlm.data.records import read_records
        from tinyvlm.data.schemas import RatingFilter
        from tinyvlm.data.readers import parse_source
        from tinyvlm.data.stream import held_out_rows

        spec = parse_source(self._source(source))
        if spec.is_records_file:
            if split is not None:
                raise ConfigError(f"--split {split}: a file of records has no splits")
            records = read_records(spec.path)  # type: ignore[arg-type]
            return Samples(spec.text, (self._sample(r) for r in records), len(records))
        rows = task_rows(spec.text, split, default_split="train")
        every_row = held_out_rows(rows, seed=0, val_fraction=None, ratings=RatingFilter(), limit=sys.maxsize)
        return Samples(rows.name, (self._sample(r) for r in every_row), rows.length)

    @staticmethod
    def _sample(record: "Record") -> Sample:
        from tinyvlm.data.records import open_image

        images = [open_image(image) for image in record.images]
        return Sample(id=record.where, messages=record.prompt, images=images, reference=record.answer)

    def score(self, prediction: str, reference: str) -> float:
        return 1.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0

    def aggregate(self, scored: Scored) -> dict[str, float]:
        return {"exact_match": _mean([s for _, s in scored])}


TASKS: dict[str, Task] = {task.name: task for task in (MMStar(), VQAv2(), ChartQA(), ExactMatch())}


def parse_tasks(tasks: str | Sequence[str]) -> list[Task]:
    """``"mmstar,chartqa"`` or a list of names -> tasks, in the order given."""
    names = [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no task given; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a task is named twice in {', '.join(names)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}")
    return [TASKS[name] for name in names]
