"""The training config in sections: each validated, flat names (TrainingArguments' and the older ones) mapped
onto them, LoRA switched explicitly, a real `train` signature, and configs of earlier versions still read."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from pydantic import ValidationError

import tinyvlm
from tinyvlm.errors import ConfigError
from tinyvlm.training.config import (
    DataSection, LoraSection, ModelSection, OptimizationSection, TrainConfig, make_config, saved_config,
)

BASE = dict(model="test-vlm", data="d.jsonl", output_dir="out")

#: The ``config`` a checkpoint's state.json held before the options had sections (written by a real run of
#: ``tinyvlm train --model test-vlm --data shapes/data.jsonl --output old --max-steps 2 --batch-size 2
#: --grad-accum 1 --checkpoint-every 1 --eval-samples 0 --no-progress --threads 1`` at commit ae5f0f3).
FLAT_CONFIG = {
    "quantize": None, "threads": 1, "data": ["shapes/data.jsonl"], "data_weights": None, "data_split": "train",
    "output": "old", "model": "test-vlm", "encoder": None, "decoder": None, "projector": None, "pretrained": True,
    "train": "projector", "max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": None, "lr_encoder": None,
    "lr_projector": None, "lr_decoder": None, "weight_decay": 0.01, "warmup_steps": None, "min_lr_ratio": 0.1,
    "grad_clip": None, "precision": "auto", "compile": False, "strategy": "ddp", "activation_checkpointing": False,
    "pack": False, "max_length": None, "val_data": None, "val_split": None, "val_fraction": 0.05, "val_rows": 512,
    "shuffle_block": 1000, "relevance_min_rating": 1, "image_correspondence_min_rating": 1,
    "visual_dependency_min_rating": 1, "formatting_min_rating": 1, "eval_every": 0, "eval_samples": 0,
    "max_new_tokens": 32, "checkpoint_every": 1, "keep_checkpoints": 2, "log_every": 10, "lora": None,
    "lora_alpha": None, "lora_targets": "q,k,v,o,gate,up,down", "lora_parts": "decoder", "lora_dropout": 0.0,
    "lora_rslora": False, "seed": 0, "resume": False, "device": None, "workers": 0, "prefetch_factor": 2,
    "progress": False, "report_to": [], "project": "tinyvlm",
}


def test_sections_flat_names_and_aliases_make_the_same_config() -> None:
    by_sections = TrainConfig(
        model=ModelSection(name="test-vlm", train="all"), data={"sources": ["d.jsonl"], "pack": True},
        optimization=OptimizationSection(max_steps=30, learning_rate=1e-3, gradient_accumulation_steps=2),
        checkpointing={"output_dir": "out"},
    )
    flat = make_config(**BASE, train="all", pack=True, max_steps=30, learning_rate=1e-3, gradient_accumulation_steps=2)
    older = make_config(model="test-vlm", data="d.jsonl", output="out", train="all", pack=True, max_steps=30, lr=1e-3,
                        grad_accum=2)
    mixed = make_config(**BASE, train="all", pack=True, optimization={"max_steps": 30, "learning_rate": 1e-3},
                        grad_accum=2)
    assert by_sections == flat == older == mixed
    assert flat.optimization.max_steps == 30 and flat.checkpointing.output_dir == Path("out")
    assert TrainConfig(**flat.model_dump(mode="json")) == flat  # what a checkpoint saves reads back


def test_every_section_is_frozen_and_refuses_unknown_fields() -> None:
    config = make_config(**BASE)
    with pytest.raises(ValidationError, match="frozen"):
        config.optimization.max_steps = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"unknown option sourcez \(valid: sources, weights, split"):
        DataSection(sourcez=["a"])
    with pytest.raises(ConfigError, match=r"unknown option model\.nam; did you mean model\.name\?"):
        make_config(data="d.jsonl", output_dir="out", model={"nam": "test-vlm"})
    with pytest.raises(ConfigError, match=r"max_steps 0: must be >= 1; save_steps -1: must be >= 0"):
        make_config(**BASE, max_steps=0, checkpointing={"save_steps": -1})


def test_lora_is_a_section_switched_on_explicitly() -> None:
    assert make_config(**BASE).lora is None
    assert make_config(**BASE, use_lora=True).lora == LoraSection()  # rank 8, every target, the decoder
    assert make_config(**BASE, lora=4).lora == make_config(**BASE, use_lora=True, lora_rank=4).lora == LoraSection(rank=4)
    assert make_config(**BASE, lora={"rank": 4}).lora == LoraSection(rank=4)
    with pytest.raises(ConfigError, match="lora_alpha, lora_rank set, but LoRA is off: turn it on with use_lora"):
        make_config(**BASE, lora_rank=4, lora_alpha=8)
    # targets and parts are lists, given as lists or comma strings, kept in one order
    for targets in ("v,q", ["v", "q"], ["v,q"]):
        assert make_config(**BASE, lora=4, lora_targets=targets).lora.targets == ("q", "v")
    assert make_config(**BASE, lora=4, lora_parts="encoder,decoder").lora_settings.parts == ("encoder", "decoder")
    on = make_config(**BASE, lora=4)
    assert TrainConfig.from_fields({"use_lora": False}, base=on).lora is None
    assert TrainConfig.from_fields({"lora_alpha": 16}, base=on).lora == LoraSection(rank=4, alpha=16)


def test_held_out_share_and_evaluation_rules() -> None:
    assert make_config(**BASE).evaluation.held_out_fraction == 0.05
    assert make_config(**BASE, val_fraction=0.2).evaluation.held_out_fraction == 0.2
    assert make_config(**BASE, val_data="v.jsonl").evaluation.held_out_fraction == 0.0
    with pytest.raises(ConfigError, match="val_data or val_fraction, not both"):
        make_config(**BASE, val_data="v.jsonl", val_fraction=0.1)
    with pytest.raises(ConfigError, match="eval_steps asks for evaluations, but val_fraction 0 holds nothing out"):
        make_config(**BASE, eval_steps=10, val_fraction=0)


def test_train_has_a_real_signature_and_takes_a_config() -> None:
    parameters = inspect.signature(tinyvlm.train).parameters
    assert list(parameters) == ["config", "fields"]
    assert parameters["config"].annotation in (TrainConfig | None, "TrainConfig | None")
    assert parameters["fields"].kind is inspect.Parameter.VAR_KEYWORD
    with pytest.raises(ConfigError, match="unknown option max_stepz; did you mean max_steps"):
        tinyvlm.train(make_config(**BASE), max_stepz=3)


def test_a_config_saved_flat_before_sections_reads_as_the_same_options() -> None:
    config = saved_config(FLAT_CONFIG)
    assert config == make_config(model="test-vlm", data="shapes/data.jsonl", output_dir="old", max_steps=2,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=1, save_steps=1,
                                 eval_samples=0, progress=False, threads=1, val_fraction=0.05)
    with_lora = saved_config({**FLAT_CONFIG, "lora": 4, "lora_targets": "q,v", "train": "none"})
    assert with_lora.lora == LoraSection(rank=4, targets=("q", "v")) and with_lora.model.train == ()
    with_val = saved_config({**FLAT_CONFIG, "val_data": "v.jsonl"})  # val_fraction was saved with its default
    assert with_val.evaluation.data == "v.jsonl" and with_val.evaluation.fraction is None


DOCS = Path(__file__).parents[2] / "docs" / "training.md"


def test_the_flag_table_of_the_docs_is_the_config() -> None:
    from tinyvlm.cli import flag
    from tinyvlm.training.config import FLAT_FIELDS

    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in DOCS.read_text().splitlines()]
    table = [row for row in rows if len(row) == 4 and row[0].startswith("`--") and row[2].startswith("`")]
    documented = {flag_cell.strip("`"): (aliases, path.strip("`")) for flag_cell, aliases, path, _ in table}
    assert set(documented) == {flag(name) for name in FLAT_FIELDS}
    for name, field in FLAT_FIELDS.items():
        aliases, path = documented[flag(name)]
        assert path == ".".join(field.path), name
        listed = [alias.strip("`") for alias in aliases.split(", ") if alias and " " not in alias.strip("`")]
        assert listed == [flag(alias) for alias in field.aliases], name


def test_the_config_files_of_the_docs_are_one_config(tmp_path: Path) -> None:
    from tinyvlm.cli import flatten_file

    text = DOCS.read_text()
    configs = []
    for form in ("toml", "yaml"):
        block = text.split(f"```{form}\n", 1)[1].split("```", 1)[0]
        (tmp_path / f"run.{form}").write_text(block)
        configs.append(TrainConfig.from_flat(flatten_file(str(tmp_path / f"run.{form}"))))
    assert configs[0] == configs[1]
    assert configs[0].optimization.batch_size == 8 and configs[0].evaluation.steps == 200
