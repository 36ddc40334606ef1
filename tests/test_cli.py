"""The `tinyvlm` command line: list-models (table and JSON), info, download, exit codes and error lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_family import TinyConfig, TinyRecipeConfig, write_checkpoint

import tinyvlm
from tinyvlm.cli import main

ROW_KEYS = {
    "key", "kind", "family", "hub_repo", "revision", "params", "dim", "license", "gated", "description", "trained",
    "cached",
}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyvlm.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyvlm "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def tiny_listing(tiny_zoo):
    tiny_zoo("tiny-10", hub_repo="tiny-org/ten", gated=True, license="tiny-license")
    tiny_zoo("tiny-2", config=TinyConfig(dim=4, hidden=6))
    tiny_zoo("tiny-dec", family="tiny-decoder", hub_repo="tiny-org/dec")
    tiny_zoo("tiny-recipe", family="tiny-vlm", config=TinyRecipeConfig(encoder="tiny-10", decoder="tiny-dec"))


def test_table(tiny_listing, capsys):
    assert main(["list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "KIND", "FAMILY", "PARAMS", "DIM", "HUB", "REPO", "LICENSE", "GATED", "CACHED"]
    assert [line.split()[0] for line in lines[1:]] == ["tiny-2", "tiny-10", "tiny-dec", "tiny-recipe"]
    # tiny-2: 32*4 embedding (tied head) + 4*6+6 fc + 6*4 out = 182 parameters
    assert lines[1].split() == ["tiny-2", "encoder", "tiny", "182", "4", "-", "(random", "init)", "apache-2.0", "no", "-"]
    assert lines[2].split()[5:] == ["tiny-org/ten", "tiny-license", "yes", "no"]
    assert lines[4].split()[1] == "vlm" and "(recipe)" in lines[4]


def test_table_filters(tiny_listing, capsys):
    assert main(["list-models", "tiny-?", "--kind", "encoder"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["tiny-2"]
    assert main(["list-models", "nothing*"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no models matching 'nothing*'" in captured.err


def test_json_schema(tiny_listing, capsys):
    assert main(["list-models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and [row["key"] for row in rows] == ["tiny-2", "tiny-10", "tiny-dec", "tiny-recipe"]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["kind"] in ("encoder", "decoder", "projector", "vlm")
        assert isinstance(row["gated"], bool) and isinstance(row["trained"], bool)
        assert row["cached"] is None if row["hub_repo"] is None and row["kind"] != "vlm" else row["cached"] is False
    assert rows[0]["params"] == 182 and rows[0]["dim"] == 4
    assert main(["list-models", "nothing*", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_json_of_the_real_zoo_matches_list_models():
    result = _cli("list-models", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["key"] for row in rows] == [spec.key for spec in tinyvlm.list_models()]
    assert rows and all(set(row) == ROW_KEYS for row in rows)


def test_info_zoo_key(tiny_listing, capsys):
    assert main(["info", "tiny-2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == ROW_KEYS | {"config"}
    assert info["config"] == {"dim": 4, "hidden": 6}
    assert main(["info", "tiny-10"]) == 0
    out = capsys.readouterr().out
    assert "key:" in out and "tiny-org/ten" in out and '"dim": 8' in out


def test_info_local_dir(tiny_zoo, tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", TinyConfig(dim=6, hidden=10))
    assert main(["info", f"local-dir:{tmp_path / 'ckpt'}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["family"], info["hub_repo"]) == ("encoder", "tiny", None)
    assert info["config"] == {"dim": 6, "hidden": 10}


def test_info_hf_hub_fetches_only_the_config(hub, tiny_zoo, tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt")
    commit = hub.add_folder("tiny-org/tiny-model", tmp_path / "ckpt")
    assert main(["info", "hf-hub:tiny-org/tiny-model", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["revision"] == commit and info["family"] == "tiny"
    assert {path.rsplit("/", 1)[1] for _, path in hub.requests} <= {"config.json", "preprocessor_config.json", "generation_config.json"}


# ----------------------------------------------------------------- info on other projects' folders


def _info(capsys, name: str) -> dict:
    assert main(["info", name, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_info_on_a_smolvlm_folder_written_by_transformers(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "formats"))
    from twins import resave_processor_with_transformers, write_smolvlm_twin

    reference = write_smolvlm_twin(tmp_path / "smolvlm")
    resave_processor_with_transformers(tmp_path / "smolvlm")
    info = _info(capsys, f"local-dir:{tmp_path / 'smolvlm'}")
    assert (info["kind"], info["family"]) == ("vlm", "smolvlm")
    assert info["params"] == sum(p.numel() for p in reference.parameters())
    assert info["config"]["parts"]["image_token_id"] == reference.config.image_token_id
    assert info["config"]["image_tokens"]["token_layout"] == "smolvlm"


def test_info_on_a_nanovlm_folder(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "formats"))
    from twins import write_nanovlm_twin

    reference = write_nanovlm_twin(tmp_path / "nanovlm")
    info = _info(capsys, f"local-dir:{tmp_path / 'nanovlm'}")
    assert (info["kind"], info["family"]) == ("vlm", "nanovlm")
    assert info["params"] == sum(p.numel() for p in reference.parameters())  # tied head counted once
    assert info["config"]["parts"]["decoder"]["family_name"] == "llama"


def test_info_on_a_config_only_idefics3_folder(tmp_path, capsys):
    """transformers' AutoConfig reads a folder holding only config.json; so does `info` (no tokenizer needed)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4),
        text_config=dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
        scale_factor=2, image_token_id=299,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "idefics3")
    assert sorted(p.name for p in (tmp_path / "idefics3").iterdir()) == ["config.json"]
    info = _info(capsys, f"local-dir:{tmp_path / 'idefics3'}")
    assert (info["kind"], info["family"]) == ("vlm", "smolvlm")
    with torch.device("meta"):
        reference = transformers.Idefics3ForConditionalGeneration(config)
    assert info["params"] == sum(p.numel() for p in reference.parameters())
    assert info["dim"] == 48 and info["config"]["parts"]["image_token_id"] == 299
    assert info["config"]["parts"]["projector"]["config"]["factor"] == 2


def test_info_on_a_config_only_nanovlm_folder_stays_offline(hub, tmp_path, capsys):
    """A nanoVLM config.json names its tokenizer by Hub repo; `info` describes the architecture without it."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "pretrained"))
    from nanovlm_reference import NanoConfig, VisionLanguageModel, config_json

    cfg = NanoConfig(lm_vocab_size=300)
    (tmp_path / "nanovlm").mkdir()
    (tmp_path / "nanovlm" / "config.json").write_text(json.dumps(config_json(cfg, "HuggingFaceTB/cosmo2-tokenizer")))
    info = _info(capsys, f"local-dir:{tmp_path / 'nanovlm'}")
    assert hub.requests == []
    assert (info["kind"], info["family"]) == ("vlm", "nanovlm")
    with torch.device("meta"):
        reference = VisionLanguageModel(cfg)
    assert info["params"] == sum(p.numel() for p in reference.parameters())  # tied head counted once
    assert info["config"]["parts"]["decoder"]["config"]["vocab_size"] == 300


def test_info_on_a_saved_folder_without_a_prefix(tmp_path, capsys, monkeypatch):
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama")
    vlm.save_pretrained(tmp_path / "my-vlm")
    monkeypatch.chdir(tmp_path)
    info = _info(capsys, "my-vlm")
    assert (info["kind"], info["family"], info["folder"]) == ("vlm", "vlm", "my-vlm")
    assert info["params"] == sum(p.numel() for p in vlm.parameters())


def test_download_zoo_key_then_listed_as_cached(hub, tiny_listing, tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt")
    hub.add_folder("tiny-org/ten", tmp_path / "ckpt", token="token")
    os.environ["HF_TOKEN"] = "token"  # restored by the isolated_hf_cache fixture's monkeypatch.delenv
    try:
        assert main(["download", "tiny-10", "tiny-2"]) == 0
    finally:
        del os.environ["HF_TOKEN"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tiny-10: ") and out[0].endswith(hub.repos["tiny-org/ten"].refs["main"])
    assert out[1] == "tiny-2: nothing to download (random init or local folder)"
    assert main(["list-models", "tiny-10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["cached"] is True


def test_download_recipe_fetches_its_parts(hub, tiny_listing, tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("HF_TOKEN", "token")
    hub.add_folder("tiny-org/ten", tmp_path / "ckpt", token="token")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    hub.add_folder("tiny-org/dec", tmp_path / "ckpt")
    assert main(["list-models", "tiny-recipe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["cached"] is False
    assert main(["download", "tiny-recipe"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["tiny-10", "tiny-dec"]
    assert hub.count("/tiny-org/dec/resolve/") and hub.count("tokenizer.json") >= 1
    assert main(["list-models", "tiny-recipe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["cached"] is True


def test_download_subprocess_against_the_stand_in(hub, tmp_path):
    spec = next(s for s in tinyvlm.list_models(kind="decoder") if s.hub_repo and not s.gated)
    write_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    hub.add_folder(spec.hub_repo, tmp_path / "ckpt")
    result = _cli("download", spec.key)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{spec.key}: ") and "snapshots" in result.stdout
    assert hub.count("tokenizer.json") == 2  # HEAD and GET
    offline = _cli("list-models", spec.key, "--json", env={"HF_HUB_OFFLINE": "1"})
    assert json.loads(offline.stdout)[0]["cached"] is True


def test_gated_download_is_one_line(hub, tmp_path):
    spec = next(s for s in tinyvlm.list_models() if s.gated and s.hub_repo)
    hub.add(spec.hub_repo, {"config.json": "{}"}, token="someone-else")
    _assert_one_line_error(_cli("download", spec.key), "tinyvlm download: error:", "is gated", "HF_TOKEN")


def test_offline_download_is_one_line():
    spec = next(s for s in tinyvlm.list_models() if s.hub_repo)
    _assert_one_line_error(_cli("download", spec.key), "HF_HUB_OFFLINE=1", f"tinyvlm download {spec.key}")


def test_unknown_name_is_one_line():
    _assert_one_line_error(_cli("info", "no-such-model"), "unknown model 'no-such-model'")
    _assert_one_line_error(_cli("info", "google/siglip-base-patch16-224"), "hf-hub:google/siglip-base-patch16-224")


def test_usage_errors_exit_2():
    result = _cli("list-models", "--kind", "tokenizer")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert _cli().returncode == 2


def test_version():
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tinyvlm {tinyvlm.__version__}"


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "tinyvlm")
    result = subprocess.run([script, "list-models", "test-*", "--kind", "encoder"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("KEY")


# ------------------------------------------------------------------------------------------- train flags


def _train_parser():
    from tinyvlm.cli import _subparsers, build_parser

    return _subparsers(build_parser(command="train"))["train"]


def _leaf_paths(model, prefix=()):
    import typing

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        inner = [k for k in (info.annotation, *typing.get_args(info.annotation)) if isinstance(k, type) and issubclass(k, BaseModel)]
        yield from _leaf_paths(inner[0], (*prefix, name)) if inner else [(*prefix, name)]


def test_train_flags_are_the_config_options_with_their_aliases_and_help():
    from tinyvlm.cli import flag
    from tinyvlm.training.config import FLAT_FIELDS, TrainConfig

    options = {action.dest: action for action in _train_parser()._actions}
    for name, field in FLAT_FIELDS.items():
        action = options[name]
        names = [flag(n) for n in (name, *field.aliases)]
        if field.annotation is bool:  # both forms, and a help that reads right for both
            names = [form for n in names for form in (n, "--no-" + n[2:])]
            assert action.help.endswith(f"(default: {'yes' if field.info.default else 'no'})"), name
        assert action.option_strings == names, name
        assert field.info.description.replace("%", "%%") in action.help, name
    # every leaf of every section (and of the sections inside sections) has a flag
    assert {f.path for f in FLAT_FIELDS.values() if f.name != "use_lora"} == set(_leaf_paths(TrainConfig))
    assert options["precision"].choices == ["auto", "fp32", "bf16"]
    assert "done by default" not in options["pretrained"].help


@pytest.mark.parametrize(("flags", "field", "value"), [
    (["--output-dir", "o"], ("checkpointing", "output_dir"), "o"),
    (["--output", "o"], ("checkpointing", "output_dir"), "o"),
    (["--output_dir", "o"], ("checkpointing", "output_dir"), "o"),
    (["--learning-rate", "0.5"], ("optimization", "learning_rate"), 0.5),
    (["--lr", "0.5"], ("optimization", "learning_rate"), 0.5),
    (["--learning_rate=0.5"], ("optimization", "learning_rate"), 0.5),
    (["--gradient-accumulation-steps", "3"], ("optimization", "gradient_accumulation_steps"), 3),
    (["--grad-accum", "3"], ("optimization", "gradient_accumulation_steps"), 3),
    (["--max_steps", "7"], ("optimization", "max_steps"), 7),
    (["--max-grad-norm", "0.5"], ("optimization", "max_grad_norm"), 0.5),
    (["--grad-clip", "0.5"], ("optimization", "max_grad_norm"), 0.5),
    (["--per-device-train-batch-size", "4"], ("optimization", "batch_size"), 4),
    (["--batch-size", "4"], ("optimization", "batch_size"), 4),
    (["--warmup-steps", "2"], ("optimization", "warmup_steps"), 2),
    (["--weight-decay", "0.1"], ("optimization", "weight_decay"), 0.1),
    (["--eval-steps", "5"], ("evaluation", "steps"), 5),
    (["--eval-every", "5"], ("evaluation", "steps"), 5),
    (["--save-steps", "5"], ("checkpointing", "save_steps"), 5),
    (["--checkpoint-every", "5"], ("checkpointing", "save_steps"), 5),
    (["--save-total-limit", "3"], ("checkpointing", "save_total_limit"), 3),
    (["--logging-steps", "2"], ("runtime", "logging_steps"), 2),
    (["--log-every", "2"], ("runtime", "logging_steps"), 2),
    (["--seed", "3"], ("runtime", "seed"), 3),
    (["--dataloader-num-workers", "2"], ("runtime", "dataloader_num_workers"), 2),
    (["--workers", "2"], ("runtime", "dataloader_num_workers"), 2),
    (["--gradient-checkpointing"], ("runtime", "gradient_checkpointing"), True),
    (["--activation-checkpointing"], ("runtime", "gradient_checkpointing"), True),
    (["--no-progress"], ("runtime", "progress"), False),
    (["--no-pretrained"], ("model", "pretrained"), False),
    (["--train", "projector,decoder"], ("model", "train"), ("projector", "decoder")),
    (["--use-lora", "--lora-rank", "4", "--train", "projector"], ("lora", "rank"), 4),
    (["--lora", "4"], ("lora", "rank"), 4),
])
def test_train_flags_take_trainingarguments_names_old_names_and_underscores(flags, field, value, monkeypatch):
    from tinyvlm import cli

    seen = {}
    monkeypatch.setattr("tinyvlm.training.loop.run", lambda config: seen.setdefault("config", config))
    base = ["train", "--model", "test-vlm", "--data", "d.jsonl"]
    assert cli.main([*base, *flags] + ([] if "o" in flags else ["--output-dir", "out"])) == 0
    section, leaf = field
    assert getattr(getattr(seen["config"], section), leaf) == (Path(value) if leaf == "output_dir" else value)


@pytest.mark.parametrize(("args", "line"), [
    (["generate", "--model", "test-vlm", "--prompt", "hi", "--temprature", "0.5"],
     "tinyvlm generate: error: unknown flag --temprature; did you mean --temperature?"),
    (["train", "--data", "d.jsonl", "--max-step", "3"], "tinyvlm train: error: unknown flag --max-step; did you mean --max-steps?"),
    (["train", "--lerning-rate", "1"], "tinyvlm train: error: unknown flag --lerning-rate; did you mean --learning-rate?"),
    (["eval", "--model", "m", "--task", "mmstar", "--limt", "3"], "tinyvlm eval: error: unknown flag --limt; did you mean --limit?"),
    (["serve", "--model", "m", "--max-bach", "3"], "tinyvlm serve: error: unknown flag --max-bach; did you mean --max-batch?"),
    (["list-models", "--jsn"], "tinyvlm list-models: error: unknown flag --jsn; did you mean --json?"),
    (["trian", "--data", "d.jsonl"], "tinyvlm: error: unknown command trian; did you mean train?"),
])
def test_an_unknown_flag_is_one_line_naming_the_closest_one(args, line):
    result = _cli(*args)
    assert result.returncode == 2 and result.stderr.splitlines() == [f"{line} (see {line.split(':')[0]} --help)"]


def test_train_errors_name_the_flag_in_plain_words():
    result = _cli("train", "--data", "d.jsonl", "--output-dir", "out", "--model", "test-vlm", "--max-steps", "0")
    _assert_one_line_error(result, "--max-steps 0: must be >= 1")
    assert "Input should be" not in result.stderr
    _assert_one_line_error(_cli("train", "--output-dir", "out", "--model", "test-vlm"), "--data is required")
    _assert_one_line_error(_cli("train", "--data", "d.jsonl", "--model", "test-vlm"), "--output-dir is required")
    _assert_one_line_error(_cli("train", "--data", "d.jsonl", "--output", "o", "--model", "test-vlm", "--lora-alpha", "4"),
                           "lora_alpha set, but LoRA is off", "--use-lora")


CONFIG_FILES = {
    "flat.json": '{"data": "d.jsonl", "output-dir": "out", "model": "test-vlm", "max_steps": 7, "lr": 0.5}',
    "flat.toml": 'data = "d.jsonl"\noutput = "out"\nmodel = "test-vlm"\nmax_steps = 7\nlearning_rate = 0.5\n',
    "sections.toml": '[model]\nname = "test-vlm"\n[data]\nsources = ["d.jsonl"]\n[optimization]\nmax_steps = 7\n'
                     'learning_rate = 0.5\n[checkpointing]\noutput_dir = "out"\n',
    "sections.yaml": "model: {name: test-vlm}\ndata:\n  sources: [d.jsonl]\noptimization:\n  max_steps: 7\n"
                     "  learning_rate: 0.5\ncheckpointing: {output_dir: out}\n",
    "mixed.yml": "model: test-vlm\ndata: d.jsonl\noutput_dir: out\noptimization: {max_steps: 7}\nlr: 0.5\n",
}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_train_config_file_in_sections_or_flat_names_with_flags_overriding_it(tmp_path, name, monkeypatch):
    from tinyvlm import cli

    seen = {}
    monkeypatch.setattr("tinyvlm.training.loop.run", lambda config: seen.setdefault("config", config))
    (tmp_path / name).write_text(CONFIG_FILES[name])
    assert cli.main(["train", "--config", str(tmp_path / name), "--learning-rate", "0.25"]) == 0
    config = seen["config"]
    assert (config.optimization.max_steps, config.optimization.learning_rate) == (7, 0.25)
    assert (config.model.name, config.data.sources, config.checkpointing.output_dir) == ("test-vlm", ["d.jsonl"], Path("out"))


def test_a_saved_run_config_is_a_config_file(tmp_path, monkeypatch):
    """What a checkpoint saves (the sections) reads back as --config, to the same config."""
    from tinyvlm import cli
    from tinyvlm.training.config import make_config

    seen = {}
    monkeypatch.setattr("tinyvlm.training.loop.run", lambda config: seen.setdefault("config", config))
    config = make_config(model="test-vlm", data="d.jsonl", output_dir="out", lora=4, lora_targets="q,v", train="none",
                         eval_steps=3, report_to="tensorboard")
    (tmp_path / "run.json").write_text(config.model_dump_json())
    assert cli.main(["train", "--config", str(tmp_path / "run.json")]) == 0
    assert seen["config"] == config


def test_train_config_file_errors(tmp_path, capsys):
    from tinyvlm import cli

    for text, message in [
        ('{"max_stepz": 3}', "--config FILE: unknown option max_stepz; did you mean max_steps?"),
        ('{"optimization": {"max_stepz": 3}}', "unknown option optimization.max_stepz; did you mean optimization.max_steps?"),
        ('{"lr": 1, "learning_rate": 2}', "learning_rate and lr are the same option (learning_rate): give it once"),
        ("{", "--config FILE: not valid JSON"),
        ("[1]", "--config FILE: expected an object of options, got list"),
    ]:
        (tmp_path / "bad.json").write_text(text)
        assert cli.main(["train", "--config", str(tmp_path / "bad.json")]) == 1
        assert message.replace("FILE", str(tmp_path / "bad.json")) in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("a: [")
    assert cli.main(["train", "--config", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert "not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_repeated_data_flags_and_their_checks(monkeypatch, capsys):
    from tinyvlm import cli

    seen = {}
    monkeypatch.setattr("tinyvlm.training.loop.run", lambda config: seen.setdefault("config", config))
    args = ["train", "--model", "test-vlm", "--output", "out", "--data", "a.jsonl", "--data-weights", "3",
            "--data", "hf-dataset:HuggingFaceM4/the_cauldron/ai2d", "--data-weights", "1", "--data-split", "train"]
    assert cli.main(args) == 0
    data = seen["config"].data
    assert data.sources == ["a.jsonl", "hf-dataset:HuggingFaceM4/the_cauldron/ai2d"] and data.weights == [3.0, 1.0]
    assert cli.main(args[:-4]) == 1
    assert "1 data weight(s) for 2 data source(s)" in capsys.readouterr().err
    assert cli.main([*args[:5], "--data", "hf-dataset:nope"]) == 1
    assert "expected hf-dataset:ORG/NAME" in capsys.readouterr().err
    assert cli.main([*args[:7], "--data-weights", "0"]) == 1
    assert "data weights must be positive" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --quantize / --threads


def _captured_model(command: str, monkeypatch) -> list:
    """Replace what ``command`` does with its loaded model by recording it (the model as the command built it),
    with the thread count and whether it was fixed while the command worked (`Work`)."""
    seen: list = []
    if command == "generate":
        from tinyvlm.vlm.model import VLM

        def stream(self, *args, **kwargs):
            seen.append(Work(self))
            return iter(())

        monkeypatch.setattr(VLM, "stream", stream)
    elif command == "eval":
        from tinyvlm.evaluation import runner

        def run_task(vlm, task, **options):
            seen.append(Work(vlm))
            return {"metric": "average", "score": 0.0, "samples": 0, "seconds": 0.0, "seconds_per_100_samples": 0.0,
                    "metrics": {}}

        monkeypatch.setattr(runner, "run_task", run_task)
    else:
        from tinyvlm.serve import app

        monkeypatch.setattr(app, "run", lambda vlm, name, config: seen.append(Work(vlm)))
    return seen


class Work:
    """A command's model, and its thread count (fixed or not) while the command used it."""

    def __init__(self, vlm) -> None:
        import torch

        from tinyvlm.inference import threads

        self.vlm, self.threads, self.pinned = vlm, torch.get_num_threads(), threads.pinned()


COMMANDS = {
    "generate": ["generate", "--model", "test-vlm", "--prompt", "Hi", "--device", "cpu"],
    "eval": ["eval", "--model", "test-vlm", "--task", "mmstar", "--device", "cpu", "--no-progress"],
    "serve": ["serve", "--model", "test-vlm", "--device", "cpu"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_and_threads_reach_the_model(command, mode, monkeypatch):
    import torch

    from tinyvlm.inference import threads
    from tinyvlm.inference.quantize import QuantizedLinear

    seen = _captured_model(command, monkeypatch)
    assert main([*COMMANDS[command], "--quantize", mode, "--threads", "1"]) == 0
    (work,) = seen
    vlm = work.vlm
    assert vlm.config.quantization.mode == mode
    assert isinstance(vlm.decoder.layers[0].self_attn.q_proj, QuantizedLinear)
    assert vlm.decoder.layers[0].self_attn.q_proj.mode == mode
    assert work.threads == 1 and work.pinned  # fixed: not tuned


@pytest.mark.parametrize("command", COMMANDS)
def test_without_the_flags_the_model_is_float_and_threads_automatic(command, monkeypatch):
    from torch import nn

    from tinyvlm.inference import threads

    seen = _captured_model(command, monkeypatch)
    assert main(COMMANDS[command]) == 0
    (work,) = seen
    vlm = work.vlm
    assert vlm.config.quantization is None and not work.pinned and not threads.pinned()
    assert isinstance(vlm.decoder.layers[0].self_attn.q_proj, nn.Linear)  # float (its decoding subclass)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--threads", "0"], "--threads 0: must be >= 1"), (["--quantize", "int3"], "invalid choice: 'int3'")],
)
def test_bad_quantize_and_threads_flags(command, flags, message, capsys):
    try:
        code = main([*COMMANDS[command], *flags])
    except SystemExit as exit_info:  # a choice argparse refuses: usage error
        code = exit_info.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err


def test_train_has_quantize_and_threads_flags():
    from tinyvlm.cli import build_parser

    args = build_parser("train").parse_args(["train", "--data", "d.jsonl", "--output", "o", "--quantize", "int4",
                                             "--threads", "2"])
    assert args.quantize == "int4" and args.threads == 2
