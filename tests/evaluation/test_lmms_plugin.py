"""tinyvlm as an lmms-eval model, with lmms-eval 0.7.3 itself (the ``eval`` extra; these tests skip where it is
not installed: see docs/evaluation.md for why CI's ``test`` extra cannot hold it and how they are run).

In process: the entry point resolves, and each request type answers as tinyvlm does (`generate_until` equals
`VLM.generate`; `loglikelihood` equals the loss `VLM.forward` computes; the multi-round protocol). Through the
real ``lmms-eval`` command, offline, on a tiny local task (``--include_path``): MMStar's own lmms-eval functions
on the shapes' MMStar-schema parquet give the score ``tinyvlm eval`` gives, sample by sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

import tinyvlm

pytest.importorskip("lmms_eval", reason="lmms-eval is in the eval extra (pip install 'tinyvlm[eval]')")

from lmms_eval.api.instance import Instance  # noqa: E402

from tinyvlm.evaluation.lmms_plugin import TinyVLMModel  # noqa: E402
from tinyvlm.errors import ConfigError  # noqa: E402

POST = "\nAnswer with the option's letter from the given choices directly"
TOKENS = 8


@pytest.fixture(scope="module")
def docs(shapes: dict[str, Path]) -> list[dict[str, Any]]:
    return list(datasets.load_dataset("parquet", data_files=str(shapes["mmstar"]), split="train"))[:6]


@pytest.fixture(scope="module")
def plugin(shapes: dict[str, Path], docs: list[dict[str, Any]]) -> TinyVLMModel:
    model = TinyVLMModel(pretrained=str(shapes["model"]), device="cpu", batch_size="4", max_new_tokens=TOKENS)
    model.task_dict = {"shapes": {"val": docs}}
    return model


def request(kind: str, doc_id: int, *arguments: Any) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=0, metadata={"task": "shapes", "doc_id": doc_id, "repeats": 1})


def visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def question(doc: dict[str, Any]) -> str:
    return doc["question"].strip() + POST


def test_the_entry_point_registers_tinyvlm() -> None:
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    resolved = MODEL_REGISTRY_V2.resolve("tinyvlm")
    assert (resolved.model_type, resolved.class_path) == ("simple", "tinyvlm.evaluation.lmms_plugin.TinyVLMModel")
    assert get_model("tinyvlm") is TinyVLMModel


def test_generate_until_answers_as_vlm_generate(plugin: TinyVLMModel, docs: list[dict[str, Any]]) -> None:
    gen_kwargs = {"until": ["\n\n"], "do_sample": False}
    answers = plugin.generate_until([request("generate_until", i, question(d), dict(gen_kwargs), visual, i, "shapes", "val")
                                     for i, d in enumerate(docs)])  # fmt: skip
    expected = [plugin.vlm.generate([{"role": "user", "content": question(d)}], images=visual(d), max_new_tokens=TOKENS)
                for d in docs]  # fmt: skip
    assert answers == [e.split("\n\n")[0] for e in expected]
    two = plugin.generate_until([request("generate_until", 0, question(docs[0]), {"max_new_tokens": 2, "until": "B"},
                                         visual, 0, "shapes", "val")])  # fmt: skip
    full = plugin.vlm.generate([{"role": "user", "content": question(docs[0])}], images=visual(docs[0]), max_new_tokens=2)
    assert two == [full.split("B")[0]]
    with pytest.raises(ConfigError, match="num_beams"):
        plugin.generate_until([request("generate_until", 0, "q", {"num_beams": 4}, visual, 0, "shapes", "val")])
    with pytest.raises(ConfigError, match="length_penalty"):
        plugin.generate_until([request("generate_until", 0, "q", {"length_penalty": 1.2}, visual, 0, "shapes", "val")])
    penalised = plugin.generate_until([request("generate_until", 0, question(docs[0]), {"repetition_penalty": 1.5},
                                               visual, 0, "shapes", "val")])  # fmt: skip
    assert penalised == [plugin.vlm.generate([{"role": "user", "content": question(docs[0])}], images=visual(docs[0]),
                                             max_new_tokens=TOKENS, repetition_penalty=1.5)]


def test_loglikelihood_is_the_loss_of_vlm_forward(plugin: TinyVLMModel, docs: list[dict[str, Any]]) -> None:
    """The continuation's mean cross-entropy (lmms-eval ranks choices by argmin of it), computed here by
    `VLM.forward` with labels on the continuation only; greedy when decoding would write exactly it."""
    vlm = plugin.vlm
    processor = vlm.processor
    doc = docs[0]
    greedy = vlm.generate([{"role": "user", "content": question(doc)}], images=visual(doc), max_new_tokens=1)
    continuations = ("A", "B", "C", "D", greedy)
    results = plugin.loglikelihood([request("loglikelihood", 0, question(doc), c, visual, 0, "shapes", "val")
                                    for c in continuations])  # fmt: skip
    prompt_ids, _ = processor.encode_prompt([{"role": "user", "content": question(doc)}], visual(doc))
    for (loss, _), continuation in zip(results, continuations):
        ids = vlm.tokenizer.encode(continuation, add_special_tokens=False)
        labels = torch.tensor([[-100] * len(prompt_ids) + ids])
        with torch.no_grad():
            out = vlm(torch.tensor([prompt_ids + ids]), pixel_values=processor.pixel_values(visual(doc)), labels=labels)
        assert loss == pytest.approx(float(out.loss), rel=1e-5) and loss > 0
    flags = [flag for _, flag in results]
    assert flags[-1] is True and sum(flags[:4]) <= 1  # the greedy answer, and at most one of the letters
    by_target = plugin.loglikelihood([request("loglikelihood", 0, question(doc), lambda d: d["answer"], visual, 0,
                                              "shapes", "val")])  # fmt: skip
    assert by_target == plugin.loglikelihood([request("loglikelihood", 0, question(doc), doc["answer"], visual, 0,
                                                      "shapes", "val")])  # fmt: skip


def test_multi_round_follows_lmms_eval_protocol(plugin: TinyVLMModel, docs: list[dict[str, Any]]) -> None:
    """Round 0 from the context; then ``doc_to_text`` gives each later round until it signals the end."""
    seen: list[dict[str, Any]] = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append({"previous": list(previous_output), "round": round_idx, "info": previous_round_info})
        if round_idx == 2:
            return None, None, True, previous_output, None
        return visual(doc), "What colour is the shape?", False, previous_output, {"asked": round_idx}

    [rounds] = plugin.generate_until_multi_round([request("generate_until_multi_round", 1, question(docs[1]),
                                                          {"until": ["\n\n"]}, visual, doc_to_text, 1, "shapes", "val")])  # fmt: skip
    first = plugin.vlm.generate([{"role": "user", "content": question(docs[1])}], images=visual(docs[1]), max_new_tokens=TOKENS)
    second = plugin.vlm.generate([{"role": "user", "content": "What colour is the shape?"}], images=visual(docs[1]),
                                 max_new_tokens=TOKENS)  # fmt: skip
    assert rounds == [first.split("\n\n")[0], second.split("\n\n")[0]]
    assert seen == [{"previous": rounds[:1], "round": 1, "info": None}, {"previous": rounds, "round": 2, "info": {"asked": 1}}]


def test_model_args_are_checked(shapes: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="unknown argument.*temperature"):
        TinyVLMModel(pretrained=str(shapes["model"]), temperature=0.5)
    with pytest.raises(ConfigError, match="batch_size 'auto'"):
        TinyVLMModel(pretrained=str(shapes["model"]), batch_size="auto")


# ---------------------------------------------------------------------------------------- the real command

TASKS_YAML = """
task: shapes_mmstar
dataset_path: parquet
dataset_kwargs:
  data_files:
    val: {data}
test_split: val
output_type: generate_until
doc_to_visual: !function utils.mmstar_doc_to_visual
doc_to_text: !function utils.mmstar_doc_to_text
doc_to_target: answer
process_results: !function utils.mmstar_process_results
generation_kwargs:
  max_new_tokens: {tokens}
metric_list:
  - metric: average
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
  - metric: fine-grained perception
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
  - metric: instance reasoning
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly"
"""
UTILS = "from lmms_eval.tasks.mmstar.utils import mmstar_aggregate_results, mmstar_doc_to_text, mmstar_doc_to_visual, mmstar_process_results\n"


def test_lmms_eval_command_runs_tinyvlm(shapes: dict[str, Path], tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shapes_mmstar.yaml").write_text(TASKS_YAML.format(data=shapes["mmstar"], tokens=TOKENS))
    (tasks / "utils.py").write_text(UTILS)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "tinyvlm", "--model_args", f"pretrained={shapes['model']}",
               "--tasks", "shapes_mmstar", "--include_path", str(tasks), "--batch_size", "4",
               "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    results_files = list((tmp_path / "out").rglob("*_results.json"))  # lmms-eval exits 0 after logging an error
    assert run.returncode == 0 and len(results_files) == 1, run.stdout[-3000:] + run.stderr[-3000:]
    [results_file] = results_files
    results = json.loads(results_file.read_text())["results"]

    ours = tinyvlm.evaluate(shapes["model"], "mmstar", data=str(shapes["mmstar"]), batch_size=4,
                            max_new_tokens=TOKENS, log_samples=True, progress=False)["tasks"]["mmstar"]
    assert results["shapes_mmstar"]["average,none"] == pytest.approx(ours["score"], abs=1e-12)
    for category in ("fine-grained perception", "instance reasoning"):
        assert results["shapes_mmstar"][f"{category},none"] == pytest.approx(ours["metrics"][category], abs=1e-12)
    [samples_file] = (tmp_path / "out").rglob("*_samples_shapes_mmstar.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
    answers = {entry["doc_id"]: entry["filtered_resps"][0] for entry in logged}
    assert [answers[i].strip() for i in range(len(answers))] == [entry["answer"] for entry in ours["log"]]
