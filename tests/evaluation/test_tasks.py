"""The tasks on data in the benchmarks' published schemas: prompts as lmms-eval writes them, scores and
aggregates of hand-made answers with hand-derived expectations, and the errors for data that does not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from tinyvlm.errors import ConfigError, DataError
from tinyvlm.evaluation.runner import evaluate, run_task
from tinyvlm.evaluation.tasks import TASKS, Sample, parse_tasks

from .schemas import chartqa_features, mmstar_features, png, vqav2_features, vqav2_row, write_parquet

MMSTAR_POST = "\nAnswer with the option's letter from the given choices directly"


class ScriptedVLM:
    """Answers each prompt with a scripted text, ended before the first stop string as `VLM.generate`
    ends it; records what each call received."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompts: list[list[dict[str, str]]], images: list[list[Any]], max_new_tokens: int,
                 stop: list[str]) -> list[str]:
        self.calls.append({"prompts": prompts, "images": images, "max_new_tokens": max_new_tokens, "stop": stop})
        assert all(len(turns) == 1 and turns[0]["role"] == "user" for turns in prompts)
        answers = [self.answers[turns[0]["content"]] for turns in prompts]
        return [min((a.split(s, 1)[0] for s in stop), key=len, default=a) for a in answers]


def mmstar_row(index: int, question: str, answer: str, category: str, l2: str) -> dict[str, Any]:
    return {"index": index, "question": question, "image": png((index * 40, 0, 0)), "answer": answer,
            "category": category, "l2_category": l2,
            "meta_info": {"source": "test", "split": "val", "image_path": f"{index}.png"}}  # fmt: skip


MMSTAR_ROWS = [
    # (question, answer, category, l2 category, the model's answer, its score)
    ("Which colour?\nOptions: A: red, B: blue, C: green, D: yellow", "A", "coarse perception", "image scene and topic", "A", 1),
    ("Which shape?\nOptions: A: a, B: b, C: c, D: d", "B", "coarse perception", "image scene and topic", "The answer is (C).", 0),
    (" Is it red? Please answer yes or no.\nOptions: A: yes, B: no ", "C", "coarse perception", "image style & quality", "  C\n\nbecause", 1),
    ("How many?\nOptions: A: 1, B: 2, C: 3, D: 4", "D", "math", "geometry", "d", 0),
    ("Which angle?\nOptions: A: 30, B: 45, C: 60, D: 90", "A", "math", "geometry", "B", 0),
    ("Which side?\nOptions: A: left, B: right, C: top, D: bottom", "B", "math", "geometry", "(B) right", 1),
]  # fmt: skip


@pytest.fixture
def mmstar_file(tmp_path: Path) -> Path:
    rows = [mmstar_row(i, q, a, c, l2) for i, (q, a, c, l2, _, _) in enumerate(MMSTAR_ROWS)]
    return write_parquet(tmp_path / "mmstar.parquet", rows, mmstar_features())


def mmstar_prompt(question: str) -> str:
    """lmms-eval's ``mmstar_doc_to_text`` with its default post-prompt, written out."""
    return question.strip().replace(" Please answer yes or no.", "") + MMSTAR_POST


def test_mmstar_samples_follow_the_published_schema(mmstar_file: Path) -> None:
    chosen = TASKS["mmstar"].samples(str(mmstar_file))
    samples = list(chosen.items)
    assert chosen.length == len(samples) == 6 and chosen.name == str(mmstar_file)  # a file is one split
    assert samples[2].messages == [{"role": "user", "content": "Is it red?\nOptions: A: yes, B: no" + MMSTAR_POST}]
    assert [s.id for s in samples] == list(range(6))
    assert samples[3].reference == "D" and samples[3].groups == {"category": "math", "l2_category": "geometry"}
    image = samples[1].images[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((0, 0)) == (40, 0, 0)


def test_mmstar_scores_and_lmms_eval_aggregation(mmstar_file: Path) -> None:
    """Per l2 category: scene [1, 0] -> 1/2, style [1] -> 1, geometry [0, 0, 1] -> 1/3. The headline
    ``average`` is their mean, 11/18 (not the 3/6 of all samples); each category averages its own l2s."""
    vlm = ScriptedVLM({mmstar_prompt(q): said for q, _, _, _, said, _ in MMSTAR_ROWS})
    result = run_task(vlm, TASKS["mmstar"], data=str(mmstar_file), split=None, limit=None, batch_size=4,
                      max_new_tokens=None, log_samples=True, progress=False)
    assert result["metric"] == "average" and result["score"] == pytest.approx(11 / 18)
    assert result["metrics"] == pytest.approx(
        {"average": 11 / 18, "accuracy": 0.5, "coarse perception": 0.75, "math": 1 / 3}
    )
    assert result["groups"]["l2_category"]["geometry"] == {"score": pytest.approx(1 / 3), "samples": 3}
    assert [entry["score"] for entry in result["log"]] == [float(s) for *_, s in MMSTAR_ROWS]
    assert result["log"][2]["answer"] == "C" and result["log"][2]["generated"] == "  C"
    assert [len(call["prompts"]) for call in vlm.calls] == [4, 2]  # batches in the data's order
    assert {call["max_new_tokens"] for call in vlm.calls} == {1024}  # MMStar sets none: the usual model default
    assert all(call["stop"] == ["\n\n"] for call in vlm.calls)  # lmms-eval's default until


def test_mmstar_aggregation_equals_lmms_eval(mmstar_file: Path) -> None:
    mmstar = pytest.importorskip("lmms_eval.tasks.mmstar.utils", reason="lmms-eval (the eval extra)")
    samples = list(TASKS["mmstar"].samples(str(mmstar_file)).items)
    said = [row[4] for row in MMSTAR_ROWS]
    docs = [{"index": s.id, "answer": s.reference, **s.groups} for s in samples]
    processed = [mmstar.mmstar_process_results(doc, [answer.split("\n\n")[0].strip()]) for doc, answer in zip(docs, said)]
    expected = {"average": mmstar.mmstar_aggregate_results([p["average"] for p in processed])}
    for category in ("coarse perception", "math"):
        expected[category] = mmstar.mmstar_aggregate_results([p[category] for p in processed if category in p])
    result = run_task(ScriptedVLM({mmstar_prompt(q): a for q, *_, a, _ in MMSTAR_ROWS}), TASKS["mmstar"],
                      data=str(mmstar_file), split=None, limit=None, batch_size=8, max_new_tokens=None,
                      log_samples=False, progress=False)
    assert {k: v for k, v in result["metrics"].items() if k != "accuracy"} == pytest.approx(expected)


def test_vqav2_soft_accuracy_per_question_and_answer_type(tmp_path: Path) -> None:
    rows = [
        vqav2_row(1001, "How many dogs?", ["two"] * 3 + ["three"] * 7, "number"),  # "Two" -> 3 of 10: 0.9
        vqav2_row(2002, "Is it sunny?", ["yes"] * 10, "yes/no"),  # "Yes." -> 1
        vqav2_row(3003, "What colour?", ["red"] + ["blue"] * 9, "other"),  # "red" (cut at the stop) -> 0.3
    ]
    data = write_parquet(tmp_path / "vqav2.parquet", rows, vqav2_features())
    post = "\nAnswer the question using a single word or phrase."
    vlm = ScriptedVLM({"How many dogs?" + post: "Two", "Is it sunny?" + post: "Yes.", "What colour?" + post: "red\n\nblue"})
    result = run_task(vlm, TASKS["vqav2_val"], data=str(data), split=None, limit=None, batch_size=2,
                      max_new_tokens=None, log_samples=True, progress=False)
    assert result["metrics"] == pytest.approx({
        "exact_match": (0.9 + 1 + 0.3) / 3, "answer_type/number": 0.9, "answer_type/yes/no": 1.0,
        "answer_type/other": 0.3,
    })  # fmt: skip
    assert [entry["id"] for entry in result["log"]] == [1001, 2002, 3003]
    assert result["log"][0]["reference"] == ["two"] * 3 + ["three"] * 7
    assert {call["max_new_tokens"] for call in vlm.calls} == {16} and vlm.calls[0]["stop"] == ["\n\n"]


def test_chartqa_relaxed_accuracy_and_its_splits(tmp_path: Path) -> None:
    rows = [
        {"type": "human_test", "question": "Value in 2019?", "answer": "12.5", "image": png((1, 2, 3))},  # "12": 4 %
        {"type": "human_test", "question": "Is it rising?", "answer": "Yes", "image": png((1, 2, 3))},  # "yes"
        {"type": "augmented_test", "question": "Share?", "answer": "50%", "image": png((1, 2, 3))},  # "0.5" = 50 %
        {"type": "augmented_test", "question": "Lowest?", "answer": "-3.1", "image": png((1, 2, 3))},  # "3": wrong sign
    ]
    data = write_parquet(tmp_path / "chartqa.parquet", rows, chartqa_features())
    post = "\nAnswer the question with a single word."
    said = {"Value in 2019?": "12", "Is it rising?": "yes", "Share?": " 0.5 ", "Lowest?": "3"}
    vlm = ScriptedVLM({q + post: a for q, a in said.items()})
    result = run_task(vlm, TASKS["chartqa"], data=str(data), split=None, limit=3, batch_size=8,
                      max_new_tokens=5, log_samples=False, progress=False)
    assert result["samples"] == 3  # limit: the first three
    assert result["metrics"] == pytest.approx({"relaxed_overall": 1.0, "relaxed_human_split": 1.0,
                                               "relaxed_augmented_split": 1.0})
    assert vlm.calls[0]["max_new_tokens"] == 5
    full = run_task(vlm, TASKS["chartqa"], data=str(data), split=None, limit=None, batch_size=8,
                    max_new_tokens=None, log_samples=False, progress=False)
    assert full["metrics"] == pytest.approx({"relaxed_overall": 0.75, "relaxed_human_split": 1.0,
                                             "relaxed_augmented_split": 0.5})


def test_folders_hold_splits(tmp_path: Path) -> None:
    """The sources training reads (`tinyvlm.data`): a save_to_disk DatasetDict by its split names, a folder of
    parquet files by the Hub's file names; the task's split is the default."""
    rows = [mmstar_row(i, q, a, c, l2) for i, (q, a, c, l2, _, _) in enumerate(MMSTAR_ROWS)]
    table = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in mmstar_features()},
                                       features=datasets.Features(mmstar_features()))  # fmt: skip
    datasets.DatasetDict({"val": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
    chosen = TASKS["mmstar"].samples(str(tmp_path / "saved"))
    assert [s.reference for s in chosen.items] == [row[1] for row in MMSTAR_ROWS]
    assert chosen.name == f"{tmp_path / 'saved'} (split val)" and chosen.length == 6
    assert len(list(TASKS["mmstar"].samples(str(tmp_path / "saved"), "test").items)) == 1
    with pytest.raises(DataError, match=r"no split 'dev' \(it has 'test', 'val'\).*tinyvlm eval: --split"):
        TASKS["mmstar"].samples(str(tmp_path / "saved"), "dev")
    (tmp_path / "vqa").mkdir()
    write_parquet(tmp_path / "vqa" / "validation-00000-of-00001.parquet",
                  [vqav2_row(7, "Why?", ["yes"] * 10, "yes/no")], vqav2_features())  # fmt: skip
    assert [s.id for s in TASKS["vqav2_val"].samples(str(tmp_path / "vqa")).items] == [7]


def test_exact_match_reads_training_schemas(tmp_path: Path) -> None:
    """Records in a dataset (here the messages schema with image bytes) are read as training reads them."""
    features = {"images": [datasets.Image()], "messages": [{"role": datasets.Value("string"),
                                                              "content": datasets.Value("string")}]}  # fmt: skip
    rows = [{"images": [png((0, 0, 255))], "messages": [{"role": "user", "content": "<image>Colour?"},
                                                        {"role": "assistant", "content": "Blue"}]}]  # fmt: skip
    data = write_parquet(tmp_path / "records.parquet", rows, features)
    [sample] = TASKS["exact_match"].samples(str(data)).items
    assert sample.messages == [{"role": "user", "content": "<image>Colour?"}] and sample.reference == "Blue"
    assert sample.images[0].getpixel((0, 0)) == (0, 0, 255)
    assert TASKS["exact_match"].score(" blue ", sample.reference) == 1.0  # training's normalisation


def test_data_that_does_not_fit_is_a_clear_error(tmp_path: Path, mmstar_file: Path) -> None:
    samples = TASKS["vqav2_val"].samples(str(mmstar_file)).items  # MMStar's columns for VQAv2
    with pytest.raises(DataError, match=r"row 0: no column 'answers'; vqav2_val reads question_id, question, answers"):
        next(samples)
    with pytest.raises(DataError, match="no such file"):
        TASKS["mmstar"].samples(str(tmp_path / "missing.parquet"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown kind of data file"):
        TASKS["mmstar"].samples(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read the parquet files"):
        TASKS["mmstar"].samples(str(tmp_path / "broken.parquet"))
    with pytest.raises(DataError, match="expected hf-dataset:ORG/NAME"):
        TASKS["mmstar"].samples("hf-dataset:just-a-name")
    with pytest.raises(DataError, match=r"hf-dataset:Lin-Chen/MMStar: cannot reach the Hub"):
        TASKS["mmstar"].samples()  # the Hub dataset, offline here
    with pytest.raises(ConfigError, match="has no default data"):
        TASKS["exact_match"].samples()
    with pytest.raises(DataError, match="match no known dataset layout"):
        next(TASKS["exact_match"].samples(str(mmstar_file)).items)
    records = tmp_path / "records.jsonl"
    records.write_text("{}\n")
    with pytest.raises(DataError, match="exact_match task"):
        TASKS["mmstar"].samples(str(records))
    with pytest.raises(ConfigError, match="one file, one split"):
        TASKS["mmstar"].samples(str(mmstar_file), "val")


def test_task_names_and_options_are_checked() -> None:
    assert [t.name for t in parse_tasks("mmstar, chartqa")] == ["mmstar", "chartqa"]
    assert [t.name for t in parse_tasks(["vqav2_val"])] == ["vqav2_val"]
    for tasks, message in [("mmstar,mmstar", "named twice"), ("mmstar,gqa", "unknown task 'gqa'"), (" , ", "no task")]:
        with pytest.raises(ConfigError, match=message):
            parse_tasks(tasks)
    vlm = ScriptedVLM({})
    with pytest.raises(ConfigError, match="one task at a time"):
        evaluate(vlm, "mmstar,chartqa", data="x.parquet")
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        evaluate(vlm, "mmstar", limit=0)
    with pytest.raises(ConfigError, match="must be a tinyvlm.VLM or a model name"):
        evaluate(vlm, "mmstar")


def test_prompts_limits_and_sources_equal_lmms_eval_task_files() -> None:
    """Each task's post-prompt, max_new_tokens, stop strings, dataset and split, read from lmms-eval's own task
    YAML files and its TaskConfig (which adds ``until`` when a task sets none)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval (the eval extra)")
    import importlib.resources

    import yaml
    from lmms_eval.api.task import TaskConfig

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # the !function tags
    folder = importlib.resources.files("lmms_eval") / "tasks"

    def read(*names: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for name in names:  # the template first, the task's own file over it
            merged.update(yaml.load((folder / name).read_text(), Loader=Loader))
        return merged

    files = {"mmstar": ("mmstar/_default_template_yaml", "mmstar/mmstar.yaml"),
             "vqav2_val": ("vqav2/_default_template_vqav2_yaml", "vqav2/vqav2_val.yaml"),
             "chartqa": ("chartqa/chartqa.yaml",)}  # fmt: skip
    for name, paths in files.items():
        config, task = read(*paths), TASKS[name]
        assert config["lmms_eval_specific_kwargs"]["default"] == {"pre_prompt": "", "post_prompt": task.post_prompt}
        assert task.source == f"hf-dataset:{config['dataset_path']}" and task.split == config["test_split"]
        kwargs = TaskConfig(task=name, output_type="generate_until", generation_kwargs=config.get("generation_kwargs")).generation_kwargs
        assert tuple(kwargs["until"]) == task.until
        assert kwargs.get("max_new_tokens", 1024) == task.max_new_tokens  # 1024: lmms-eval's usual model default


def test_answers_are_stripped() -> None:
    assert TASKS["mmstar"].answer("  B ") == "B"
