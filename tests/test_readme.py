"""The README's quick start runs as written: its first python block, offline, in a fresh process and an
empty working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def quick_start() -> str:
    """The first ```python block under the ``## Quick start`` heading."""
    text = README.read_text()
    section = text[text.index("\n## Quick start\n") :]
    section = section[: section.find("\n## ", 1)]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "the quick start has no python block"
    return block.group(1)


def test_quick_start_runs_offline_as_written(tmp_path: Path) -> None:
    code = quick_start()
    assert "import tinyvlm" in code and "from PIL import" in code
    (tmp_path / "quick_start.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # conftest: an empty HF_HOME too
    done = subprocess.run(
        [sys.executable, "quick_start.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "my-vlm" / "model.safetensors").is_file()  # it ran to the save and past it
