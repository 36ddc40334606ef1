"""``tinyvlm generate``: from a saved model, a recipe or an encoder + decoder; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyvlm.cli import main
from tinyvlm.api import build_vlm


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 255, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_generate_from_a_saved_model_streams_the_answer(tmp_path: Path, image_file: Path, capsys) -> None:
    torch.manual_seed(0)
    vlm = build_vlm("test-dinov3", "test-gemma3", pretrained=False, projector_kwargs={"factor": 2})
    folder = vlm.save_pretrained(tmp_path / "model")
    expected = vlm.generate("What is shown?", [image_file], max_new_tokens=6)
    code = main(["generate", "--model", str(folder), "--image", str(image_file), "--prompt", "What is shown?",
                 "--max-new-tokens", "6", "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_from_encoder_and_decoder(image_file: Path, capsys) -> None:
    code = main(["generate", "--encoder", "test-siglip", "--decoder", "test-llama", "--projector", "mlp",
                 "--image", str(image_file), "--prompt", "<image> Hi", "--max-new-tokens", "3", "--device", "cpu"])
    assert code == 0 and capsys.readouterr().out.endswith("\n")
    assert main(["generate", "--model", "test-vlm", "--image", str(image_file), "--prompt", "Hi",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0


def test_errors_are_one_line(tmp_path: Path, image_file: Path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    code = main(["generate", "--encoder", "test-siglip", "--decoder", "test-llama", "--image", str(bad),
                 "--prompt", "Hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("tinyvlm generate: error: cannot read image file") and err.count("\n") == 1
    code = main(["generate", "--encoder", "test-siglip", "--image", str(image_file), "--prompt", "Hi"])
    assert code == 1 and "--encoder needs --decoder" in capsys.readouterr().err
    code = main(["generate", "--model", "nanovlm-999m", "--prompt", "Hi"])
    assert code == 1 and "Did you mean" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "Hi"])  # neither --model nor --encoder
    assert exit_info.value.code == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA (the CPU build CI uses)")
def test_cuda_device_on_a_cpu_torch_is_one_line(image_file: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tinyvlm.cli", "generate", "--model", "test-vlm", "--image", str(image_file),
         "--prompt", "hi", "--device", "cuda"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "CPU-only build" in result.stderr and "--device cpu" in result.stderr

@pytest.fixture
def saved_model(tmp_path: Path) -> tuple[Path, object]:
    torch.manual_seed(0)
    vlm = build_vlm("test-siglip", "test-llama", pretrained=False, projector_kwargs={"factor": 2})
    with torch.no_grad():  # random-init norms start at 1: spread them so that answers vary with the options
        for p in vlm.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return vlm.save_pretrained(tmp_path / "model"), vlm


def test_cli_and_python_api_start_from_the_same_ids(saved_model, image_file: Path, monkeypatch, capsys) -> None:
    """The same prompt is one user turn in both (and plain text in both with --raw / raw=True)."""
    import tinyvlm.vlm.model as model

    folder, vlm = saved_model
    starts: list[tuple[torch.Tensor, torch.dtype]] = []
    start = model.generate_tokens

    def recorded(decoder, input_ids, sampling, **inputs):
        starts.append((input_ids.clone(), decoder.embed_tokens.weight.dtype))
        return start(decoder, input_ids, sampling, **inputs)

    monkeypatch.setattr(model, "generate_tokens", recorded)
    for raw in (False, True):
        flags = ["--raw"] if raw else []
        assert main(["generate", "--model", str(folder), "--image", str(image_file), "--prompt", "What is shown?",
                     "--max-new-tokens", "3", "--device", "cpu", *flags]) == 0
        vlm.generate("What is shown?", [image_file], max_new_tokens=3, raw=raw)
        (cli_ids, _), (api_ids, _) = starts[-2:]
        assert torch.equal(cli_ids, api_ids)
        assert torch.equal(api_ids, vlm.processor("What is shown?", [image_file], raw=raw)["input_ids"])
    assert not torch.equal(starts[0][0], starts[2][0])
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--image", str(image_file), "--prompt", "Hi",
                 "--max-new-tokens", "2", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert starts[-1][1] == torch.bfloat16


def test_sampling_flags_reach_generation(saved_model, image_file: Path, capsys) -> None:
    folder, vlm = saved_model
    common = ["generate", "--model", str(folder), "--image", str(image_file), "--prompt", "What is shown?",
              "--device", "cpu", "--max-new-tokens", "12"]
    sampled = dict(temperature=30.0, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=3)
    expected = vlm.generate("What is shown?", [image_file], max_new_tokens=12, **sampled)
    assert main([*common, "--temperature", "30", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.3",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert expected != vlm.generate("What is shown?", [image_file], max_new_tokens=12)  # the flags mattered
    free = vlm.generate("What is shown?", [image_file], max_new_tokens=12, temperature=1.0, seed=0)
    stop = next(free[k : k + 2] for k in range(4, len(free)) if free.find(free[k : k + 2]) == k and free[k : k + 2].isalpha())
    assert main([*common, "--temperature", "1", "--seed", "0", "--stop", stop, "--stop", "\x00never"]) == 0
    assert capsys.readouterr().out == free[: free.find(stop)] + "\n"
    assert 4 <= free.find(stop) < len(free.rstrip())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
        (["--top-p", "1.5"], "--top-p: Input should be less than or equal to 1"),
        (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty: Input should be greater than 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens: Input should be greater than or equal to 0"),
        (["--stop", ""], "--stop: stop strings must not be empty"),
        (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
    ],
)
def test_bad_sampling_flags_are_one_line_errors_naming_the_flag(image_file: Path, capsys, flags, message) -> None:
    code = main(["generate", "--model", "test-vlm", "--image", str(image_file), "--prompt", "Hi", "--device", "cpu",
                 *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"tinyvlm generate: error: {message}")
