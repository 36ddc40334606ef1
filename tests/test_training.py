"""Training: loss masking, packing isolation, freezing, schedule, exact resume after a kill, 2-process DDP, on JSONL
files and on streamed datasets (parquet, mixes, the loopback Hub), skipped data reported, image splitting."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import tinyvlm
from tinyvlm.data import IGNORE_INDEX, collate, encode_records, read_records
from tinyvlm.evaluation.shapes import make_shapes_dataset
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.training.config import make_config
from tinyvlm.training.loop import build_model, lr_factor, summed_loss

sys.path.insert(0, str(Path(__file__).parent / "data"))
from writers import cauldron_rows, finevision_rows, write_parquet  # noqa: E402

MODEL = dict(model="test-vlm")  # test-siglip + pixel shuffle 2 + test-llama


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=40, seed=1)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = tinyvlm.build_vlm("test-vlm", dtype=torch.float32)
    with torch.no_grad():  # a spread at which context matters (the 0.02 init is near-uniform attention)
        for weight in model.decoder.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape) * 0.2)  # the same values in any weight layout
    return model


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinyvlm.cli", *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# ------------------------------------------------------------------------------------------------ options


def test_lr_schedule_warmup_then_cosine() -> None:
    f = lambda s: lr_factor(s, max_steps=10, warmup_steps=4, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert all(f(s) > f(s + 1) for s in range(4, 9))
    assert lr_factor(0, max_steps=1, warmup_steps=0, min_lr_ratio=0.1) == 1.0


def test_parts_and_option_errors(data: Path, tmp_path: Path) -> None:
    base = dict(data=data, output=tmp_path)
    assert make_config(**MODEL, **base, train="all").model.train == ("encoder", "projector", "decoder")
    assert make_config(**MODEL, **base, train="decoder, projector").model.train == ("projector", "decoder")
    for options, message in [
        (dict(MODEL, train="head"), "expected 'all', 'none' or a comma list"),
        (dict(MODEL, encoder="test-siglip", decoder="test-llama"), "either model"),
        (dict(encoder="test-siglip"), "both encoder and decoder"),
        (dict(MODEL, batch_size=0), "per_device_train_batch_size 0: must be >= 1"),
        (dict(MODEL, lerning_rate=1.0), "unknown option lerning_rate; did you mean learning_rate?"),
        (dict(MODEL, val_data=data, val_fraction=0.1), "val_data or val_fraction"),
        (dict(MODEL, use_lora=True, strategy="fsdp"), "use strategy ddp"),
        (dict(MODEL, strategy="zero"), "strategy"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_config(**base, **options)


# ------------------------------------------------------------------------------------------------ losses


def test_loss_only_on_assistant_tokens(vlm, data: Path) -> None:
    record = read_records(data)[0]
    (example,) = encode_records([record], vlm.processor.encode_example, max_length=None)
    labelled = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert [label for label in example.labels if label != IGNORE_INDEX] == labelled
    assert vlm.tokenizer.decode(labelled) == record.answer + "<|im_end|>\n"
    first = example.labels.index(labelled[0])
    assert all(label == IGNORE_INDEX for label in example.labels[:first])
    assert example.input_ids.count(vlm.image_token_id) == 16  # 8x8 patches, shuffle 2

    batch = collate([example], [vlm.processor.pixel_values(record.images)], pad_id=0, packed=False, max_length=None)
    with torch.no_grad():
        summed = summed_loss(vlm, batch)
        logits = vlm(batch.input_ids, pixel_values=batch.pixel_values).logits[0]
    positions = [t - 1 for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    expected = F.cross_entropy(logits[positions], torch.tensor(labelled), reduction="sum")
    assert torch.allclose(summed, expected, rtol=1e-5)


def per_sample_losses(vlm, batch) -> dict[int, float]:
    with torch.no_grad():
        logits = vlm(
            batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch.labels[:, 1:].shape)
    segments = batch.segments[:, 1:]
    return {int(i): float(losses[segments == i].sum()) for i in segments.unique() if i >= 0}


def test_packed_batch_gives_each_sample_its_own_loss(vlm, data: Path) -> None:
    records = read_records(data)[:6]
    records[0] = records[0].__class__(  # a two-turn conversation among them
        messages=records[0].messages + ({"role": "user", "content": "And?"}, {"role": "assistant", "content": "ok"}),
        images=records[0].images, where="two-turn",
    )
    examples = encode_records(records, vlm.processor.encode_example, max_length=None)
    pixels = [vlm.processor.pixel_values(e.images) for e in examples]
    longest = max(len(e) for e in examples)
    packed = collate(examples, pixels, pad_id=0, packed=True, max_length=3 * longest)
    assert packed.input_ids.shape[0] == 2  # really packed: 6 samples in 2 rows
    alone = {}
    for i, (example, pixel_values) in enumerate(zip(examples, pixels)):
        single = collate([example], [pixel_values], pad_id=0, packed=False, max_length=None)
        alone[i] = per_sample_losses(vlm, single)[0]
    together = per_sample_losses(vlm, packed)
    padded = per_sample_losses(vlm, collate(examples, pixels, pad_id=0, packed=False, max_length=None))
    for i in alone:
        assert abs(together[i] - alone[i]) <= 1e-5 * abs(alone[i]), (i, together[i], alone[i])
        assert abs(padded[i] - alone[i]) <= 1e-5 * abs(alone[i]), (i, padded[i], alone[i])

    # The check can fail: without the block mask and position reset (nanoVLM's packing) samples leak.
    leaky = collate(examples, pixels, pad_id=0, packed=True, max_length=3 * longest)
    leaky.attention_mask = (leaky.segments >= 0).long()
    leaky.position_ids = None
    leaked = per_sample_losses(vlm, leaky)
    assert sum(abs(leaked[i] - alone[i]) > 1e-3 * abs(alone[i]) for i in alone) >= 2


# ------------------------------------------------------------------------------------------------ runs


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_frozen_parts_do_not_change(data: Path, tmp_path: Path) -> None:
    options = dict(MODEL, data=data, output=tmp_path / "run", train="projector", max_steps=2, batch_size=4,
                   grad_accum=1, checkpoint_every=0, eval_samples=2, progress=False)
    result = tinyvlm.train(**options)
    initial = build_model(make_config(**options), torch.device("cpu")).state_dict()
    trained = weights(result.model_dir)
    changed = {name for name, tensor in trained.items() if not torch.equal(tensor, initial[name])}
    assert changed == {name for name in trained if name.startswith("projector.")} == {"projector.proj.weight"}
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 2] and set(log[0]["lr"]) == {"projector"}  # one bias-free Linear
    assert 0 <= log[1]["val_accuracy"] <= 1 and log[1]["val_answered"] == 2
    loaded = tinyvlm.load_vlm(f"local-dir:{result.model_dir}")
    assert isinstance(loaded.generate("What colour is the shape?", images=[data.parent / "images/00000.png"],
                                      max_new_tokens=3), str)


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def torchrun(*args: str) -> list[str]:
    """``tinyvlm ARGS`` in 2 gloo processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tinyvlm.cli",
            *args]


def kill_and_resume(common: list[str], tmp_path: Path, *, kill_at: int, resume: tuple[str, ...] = (),
                    launch: Callable[..., list[str]] = cli) -> tuple[Path, Path]:
    """Run ``common`` straight, and again SIGKILLed once checkpoint ``kill_at`` exists then resumed (with the
    extra flags ``resume``, e.g. another --workers); the final weights must be bit-identical. ``launch``: one
    process (`cli`) or two (`torchrun`; the kill then reaches the launcher and its workers)."""
    straight = tmp_path / "straight"
    subprocess.run(launch(*common, "--output", str(straight)), check=True, env=run_env(), timeout=240)
    killed = tmp_path / "killed"
    process = subprocess.Popen(launch(*common, "--output", str(killed)), env=run_env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / f"step-{kill_at:08d}").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "model").exists()  # really killed mid-way
    subprocess.run(launch(*common, "--output", str(killed), "--resume", *resume), check=True, env=run_env(),
                   timeout=240)
    expected, resumed = weights(straight / "model"), weights(killed / "model")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert losses(killed) == losses(straight)
    return straight, killed


def test_killed_run_resumes_to_the_same_weights(data: Path, tmp_path: Path) -> None:
    common = ["train", "--model", "test-vlm", "--data", str(data), "--train", "all",
              "--max-steps", "10", "--batch-size", "2", "--grad-accum", "2", "--checkpoint-every", "2",
              "--log-every", "1", "--eval-samples", "0", "--no-progress", "--pack", "--max-length", "200"]
    straight, killed = kill_and_resume(common, tmp_path, kill_at=4)
    assert len(losses(straight)) == 10
    refused = subprocess.run(cli(*common, "--output", str(killed)), env=run_env(), capture_output=True, text=True)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    changed = subprocess.run(cli(*common, "--output", str(killed), "--resume", "--lr", "0.1"), env=run_env(),
                             capture_output=True, text=True)
    assert changed.returncode == 1 and "options changed" in changed.stderr
    assert "learning_rate: None -> 0.1" in changed.stderr


def two_processes_match_one(common: list[str], tmp_path: Path, *, batch_size: int,
                            two: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """2 gloo processes with ``batch_size`` (and the extra flags ``two``, e.g. a strategy) give the losses of 1
    process with twice that batch, within 1e-5."""
    subprocess.run(cli(*common, "--batch-size", str(2 * batch_size), "--output", str(tmp_path / "one")), check=True,
                   env=run_env(), timeout=180)
    subprocess.run(torchrun(*common, "--batch-size", str(batch_size), *two, "--output", str(tmp_path / "two")),
                   check=True, env=run_env(), timeout=240)
    logs = {}
    for run in ("one", "two"):
        logs[run] = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) >= 3
    assert len(set(one)) > 2  # it trains
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    assert logs["one"][-1]["val_answered"] == logs["two"][-1]["val_answered"]
    assert logs["one"][-1]["val_loss"] == pytest.approx(logs["two"][-1]["val_loss"], rel=1e-5)
    # Weights agree closely but not to 1e-5 everywhere: AdamW divides by sqrt(v), so an element whose
    # gradient is ~0 moves by ~lr in a direction set by rounding noise. Compare tensors as a whole.
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    for name in a:
        assert (a[name] - b[name]).norm() <= 1e-3 * b[name].norm(), name
    return logs


def test_two_gloo_processes_match_one_process_with_double_batch(data: Path, tmp_path: Path) -> None:
    common = ["train", "--model", "test-vlm", "--data", str(data), "--train", "all",
              "--max-steps", "4", "--grad-accum", "1", "--log-every", "1", "--checkpoint-every", "0",
              "--eval-samples", "4", "--no-progress", "--lr", "1e-3"]
    logs = two_processes_match_one(common, tmp_path, batch_size=2)
    assert logs["one"][-1]["val_answered"] == 2  # held-out: 2 of 40


# ------------------------------------------------------------------------------------------------ strategies

SHARDED = ["train", "--model", "test-vlm", "--data", "DATA", "--train", "all", "--grad-accum", "2", "--log-every", "1",
           "--no-progress", "--lr", "1e-3"]


def test_two_fsdp_processes_match_one_process_with_double_batch(data: Path, tmp_path: Path) -> None:
    common = [str(data) if arg == "DATA" else arg for arg in SHARDED]
    common += ["--max-steps", "4", "--checkpoint-every", "0", "--eval-samples", "4"]
    logs = two_processes_match_one(common, tmp_path, batch_size=2, two=("--strategy", "fsdp", "--activation-checkpointing"))
    assert logs["one"][-1]["val_answered"] == 2
    assert logs["two"][0]["grad_norm"] == pytest.approx(logs["one"][0]["grad_norm"], rel=1e-5)  # the full norm, not a shard's


def test_killed_fsdp_run_resumes_to_the_same_weights(data: Path, tmp_path: Path) -> None:
    # checkpoints hold the gathered model and AdamW state, the files of a one-process run
    common = [str(data) if arg == "DATA" else arg for arg in SHARDED]
    common += ["--strategy", "fsdp", "--max-steps", "6", "--batch-size", "1", "--checkpoint-every", "2",
               "--eval-samples", "1", "--pack", "--max-length", "200"]
    straight, _ = kill_and_resume(common, tmp_path, kill_at=2, launch=torchrun)
    saved = load_file(str(straight / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert saved.keys() == weights(straight / "model").keys()
    for name, tensor in weights(straight / "model").items():
        assert torch.equal(saved[name], tensor), name


def test_activation_checkpointing_keeps_only_block_inputs(vlm, data: Path) -> None:
    """The forward saves far fewer tensors for the backward with checkpointing, and the gradients are the same."""
    import copy

    from tinyvlm.training.strategies import checkpoint_activations

    examples = encode_records(read_records(data)[:2], vlm.processor.encode_example, max_length=None)
    pixels = [vlm.processor.pixel_values(e.images) for e in examples]
    batch = collate(examples, pixels, pad_id=0, packed=False, max_length=None)

    def saved_and_grads(model) -> tuple[int, dict[str, torch.Tensor]]:
        count = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return tensor

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = summed_loss(model, batch)
        loss.backward()
        return count, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = copy.deepcopy(vlm)
    checkpointed = copy.deepcopy(vlm)
    checkpoint_activations(checkpointed)
    (plain_count, plain_grads), (count, grads) = saved_and_grads(plain), saved_and_grads(checkpointed)
    assert count < plain_count / 2, (count, plain_count)
    assert plain_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------ datasets


@pytest.fixture(scope="module")
def cauldron(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """the_cauldron rows (written by datasets, Image features) in two parquet files of a folder."""
    folder = tmp_path_factory.mktemp("cauldron") / "data"
    write_parquet(folder / "train-00000-of-00002.parquet", "the_cauldron", cauldron_rows(30, size=(40, 40)))
    write_parquet(folder / "train-00001-of-00002.parquet", "the_cauldron", cauldron_rows(26, start=30, size=(40, 40)))
    return folder


def test_killed_run_on_a_mix_of_streams_resumes_to_the_same_weights(cauldron: Path, data: Path, tmp_path: Path) -> None:
    common = ["train", "--model", "test-vlm", "--data", str(cauldron), "--data", str(data),
              "--data-weights", "3", "--data-weights", "1", "--shuffle-block", "8", "--train", "all",
              "--max-steps", "6", "--batch-size", "2", "--grad-accum", "2", "--checkpoint-every", "2",
              "--log-every", "1", "--eval-samples", "1", "--no-progress", "--lr", "1e-3"]
    straight, killed = kill_and_resume(common, tmp_path, kill_at=2, resume=("--workers", "2"))
    state = json.loads((killed / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["data"]["position"] == 4 * 4 and state["data"]["sources"][0]["block"] > 0  # mid-stream
    log = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "val_loss" in e] == [6]


def test_two_gloo_processes_stream_the_samples_of_one(cauldron: Path, tmp_path: Path) -> None:
    # max_length 101 skips the rows after picture 9 and the two-turn ones: with one sample per process and
    # micro-batch, a process whose sample is skipped still joins the all-reduce (the zero-weight filler), and
    # some steps skip every sample (the weights must then stay, in one process as in two)
    common = ["train", "--model", "test-vlm", "--data", str(cauldron), "--shuffle-block", "16", "--train", "all",
              "--max-steps", "6", "--grad-accum", "2", "--log-every", "1", "--checkpoint-every", "0",
              "--eval-samples", "2", "--no-progress", "--lr", "1e-3", "--val-data", str(cauldron), "--val-rows", "4",
              "--max-length", "101"]
    logs = two_processes_match_one(common, tmp_path, batch_size=1)
    assert logs["one"][-1]["val_answered"] == 2
    skipped = [[e["skipped"]["too_long"] for e in logs[run] if "loss" in e] for run in ("one", "two")]
    assert skipped[0] == skipped[1] and skipped[0][-1] >= 12
    assert 0.0 in losses(tmp_path / "one") and sum(loss > 0 for loss in losses(tmp_path / "one")) >= 2


def test_skips_are_counted_and_reported_without_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = finevision_rows(12)
    for row in rows[:3]:  # every turn rated low on image correspondence: the filter empties these rows
        row["image_correspondence_ratings"] = [1, 1]
    rows[5]["texts"][0]["assistant"] = "very " * 60 + "long"  # longer than max_length
    write_parquet(tmp_path / "fv.parquet", "finevision", rows)
    result = tinyvlm.train(**MODEL, data=tmp_path / "fv.parquet", output=tmp_path / "run", max_steps=3, batch_size=4,
                           grad_accum=1, checkpoint_every=0, eval_samples=0, val_data=tmp_path / "fv.parquet",
                           val_rows=4, relevance_min_rating=3, image_correspondence_min_rating=2, max_length=120,
                           progress=False)
    # 3 steps of 4 = 12 positions over the 9 usable rows: some rows twice (a second epoch)
    assert result.skipped["filtered_rows"] >= 3 and result.skipped["too_long"] >= 1
    assert result.skipped["dropped_turns"] >= 9 + 3 * 2  # the second turn of every usable row, both of the emptied
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-2]["skipped"] == result.skipped
    err = capsys.readouterr().err
    assert f"data: {result.skipped['too_long']} sample(s) longer than max_length=120 skipped (e.g. " in err
    assert "fv.parquet row 5" in err and "row(s) skipped: the rating filters dropped every turn" in err
    assert "held-out loss" in err and "saved the model to" in err  # results print with progress=False
    assert "step 1/3" not in err  # but not the progress


def test_resuming_a_finished_run_evaluates_once(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = dict(MODEL, data=data, output=tmp_path / "run", max_steps=2, batch_size=2, grad_accum=1,
                   checkpoint_every=1, eval_samples=1, log_every=1)
    tinyvlm.train(**options)
    err = capsys.readouterr().err  # stderr is not a terminal here: one line per evaluation phase
    assert "evaluating: loss 1/1 batches" in err and "evaluating: answers 1/1 batches" in err
    tinyvlm.train(**options, resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "val_loss" in e] == [2]
    assert [e["step"] for e in log if "loss" in e] == [1, 2]


def test_split_options_for_files(data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is one file, read as split 'train': it has no split 'validation'"):
        tinyvlm.train(**MODEL, data=data, output=tmp_path / "a", data_split="validation")
    with pytest.raises(ConfigError, match="val_split is the split of val_data"):
        tinyvlm.train(**MODEL, data=data, output=tmp_path / "b", val_split="test")


def test_image_splitting_trains_with_the_inference_layout(tmp_path: Path) -> None:
    from tinyvlm.data.loading import SampleMaker
    from tinyvlm.data.readers import open_rows, parse_source
    from tinyvlm.data.schemas import RatingFilter, detect_schema

    tinyvlm.build_vlm("test-vlm", processor_kwargs={"split_images": True, "max_grid": 2}).save_pretrained(tmp_path / "split")
    write_parquet(tmp_path / "big.parquet", "the_cauldron", cauldron_rows(8, size=(128, 96)))  # 2 x 2 tiles + global
    result = tinyvlm.train(model=f"local-dir:{tmp_path / 'split'}", data=tmp_path / "big.parquet", output=tmp_path / "run",
                           max_steps=2, batch_size=2, grad_accum=1, checkpoint_every=0, eval_samples=1, progress=False,
                           val_fraction=0.2, log_every=1)
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "run")) and math.isfinite(result.metrics["val_loss"])
    trained = tinyvlm.load_vlm(f"local-dir:{result.model_dir}")
    assert trained.config.image_tokens.split_images
    rows = open_rows(parse_source(str(tmp_path / "big.parquet")), "train")
    row = next(rows.read())
    record = detect_schema(rows.columns, source="big").convert(row, where="big row 0", base=None, ratings=RatingFilter()).record
    prepared = SampleMaker(trained.processor, max_length=None)[record]
    image = Image.open(io.BytesIO(row["images"][0]["bytes"]))
    prompt_ids, _ = trained.processor.encode_prompt(record.prompt, [image])
    assert prepared.example.input_ids[: len(prompt_ids)] == prompt_ids
    assert prepared.example.input_ids.count(trained.image_token_id) == 5 * trained.processor.tokens_per_view
    assert torch.equal(prepared.pixels, trained.processor(record.prompt, [image])["pixel_values"])


def test_streaming_from_the_loopback_hub(hub, cauldron: Path, tmp_path: Path) -> None:
    readme = ("---\nconfigs:\n- config_name: ai2d\n  data_files:\n  - split: train\n    path: ai2d/train-*\n"
              "  - split: test\n    path: ai2d/test-*\n---\n# the_cauldron-like\n")
    files = sorted(cauldron.glob("*.parquet"))
    commit = hub.add("org/cauldron", {"README.md": readme, "ai2d/train-00000-of-00001.parquet": files[0],
                                      "ai2d/test-00000-of-00001.parquet": files[1]}, repo_type="dataset")
    common = ["train", "--model", "test-vlm", "--data", f"hf-dataset:org/cauldron/ai2d@{commit}",
              "--val-data", "hf-dataset:org/cauldron/ai2d", "--val-split", "test", "--val-rows", "4",
              "--batch-size", "2", "--grad-accum", "1", "--checkpoint-every", "0", "--eval-samples", "2",
              "--no-progress", "--output", str(tmp_path / "run")]
    env = {**run_env(), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    unknown = subprocess.run(cli(*common), env=env, capture_output=True, text=True, timeout=180)
    assert unknown.returncode == 1 and "is not known before reading it: give --max-steps" in unknown.stderr
    subprocess.run(cli(*common, "--max-steps", "2"), check=True, env=env, timeout=180)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 2] and log[1]["val_answered"] == 2
    assert hub.count(f"/datasets/org/cauldron/resolve/{commit}/ai2d/train-00000-of-00001.parquet") >= 1
    assert hub.count("/api/datasets/org/cauldron/tree/") >= 1
