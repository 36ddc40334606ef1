"""``tinyvlm generate``: from a saved model, a recipe or an encoder + decoder; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyvlm.cli import main
from tinyvlm.vlm.building import build_vlm


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
