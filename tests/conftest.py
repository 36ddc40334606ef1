"""Shared fixtures. Every test runs with its own empty Hugging Face cache and offline by default, so no test
can read the user's cache or reach the real Hub; the `hub` fixture serves a loopback stand-in instead."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/hub_server.py, tests/tiny_family.py

from hub_server import FakeHub  # noqa: E402


@pytest.fixture(autouse=True)
def strict_image_decoding() -> None:
    """PIL's default: a truncated image is an error. Importing lmms-eval (``lmms_eval.api.task``) switches
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` on for the whole process, and an xdist worker that collected the
    lmms-eval tests would then accept the truncated images other tests send on purpose."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.fixture(autouse=True)
def restored_thread_count() -> Iterator[None]:
    """A test that sets threads (``threads=`` / ``--threads``, which also stop the automatic choice,
    `tinyvlm.inference.threads`) leaves torch's count and the automatic choice as they were for the next one."""
    import torch

    from tinyvlm.inference import threads

    count, pinned = torch.get_num_threads(), threads._pinned
    yield
    torch.set_num_threads(count)
    threads._pinned = pinned


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME per test, offline, no token: for this process (huggingface_hub reads its settings at
    import, hence the patched constants) and for subprocesses (the environment)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    _point_at(monkeypatch, "http://127.0.0.1:9")
    # huggingface_hub retries failed requests with back-off sleeps (about 23 s in all): skip the waiting.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None, time=time.time))
    return home


def _point_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, isolated_hf_cache: Path):
    """A running loopback Hub, online: huggingface_hub in this process and subprocesses talk to it."""
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        _point_at(monkeypatch, server.url)
        yield server


@pytest.fixture
def offline_switch(monkeypatch: pytest.MonkeyPatch):
    """A function that switches to HF_HUB_OFFLINE=1 in the middle of a test (after downloading via `hub`)."""
    from huggingface_hub import constants

    def switch() -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    return switch


@pytest.fixture
def tiny_zoo(monkeypatch: pytest.MonkeyPatch):
    """An isolated registry holding only the test-only ``tiny`` family (no shipped index, no built-in family
    modules to load); returns a function that registers zoo entries of it (``register("tiny-x",
    hub_repo=..., revision=..., gated=...)``); families ``tiny`` (encoder), ``tiny-decoder`` and ``tiny-vlm``
    (recipes naming an encoder and a decoder). Lookups go the user's way: the registry merges the (empty)
    index with these live registrations."""
    from tinyvlm.config import Config

    from tiny_family import DECODER_FAMILY, FAMILY, RECIPE_FAMILY, TinyConfig

    from tinyvlm import registry

    monkeypatch.setattr(registry, "_FAMILIES", {})
    monkeypatch.setattr(registry, "_ENTRIES", {})
    monkeypatch.setattr(registry, "_live_cache", {})
    monkeypatch.setattr(registry, "_index_cache", {})
    monkeypatch.setattr(registry, "FAMILY_MODULES", ())
    monkeypatch.setattr(registry, "_families_loaded", False)
    for family in (FAMILY, DECODER_FAMILY, RECIPE_FAMILY):
        registry.register_family(family)

    def register(key: str, *, family: str = "tiny", config: Config = TinyConfig(), **options) -> None:
        options.setdefault("license", "apache-2.0")
        options.setdefault("description", "test-only tiny model")
        registry.register_model(key, family=family, config=config, **options)

    return register
