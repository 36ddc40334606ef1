"""Hub names and downloads against the loopback stand-in (tests/hub_server.py): every name form, the cache
and offline mode, revision pinning, sharded checkpoints and each error path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_family import TinyConfig, TinyModule, checkpoint_tensors, hf_config, write_checkpoint

from tinyvlm.errors import HubError, UnknownModelError, WeightsError
from tinyvlm.api import build_encoder
from tinyvlm.sources import download_model, is_cached, resolve

REPO = "tiny-org/tiny-model"


def _publish(hub, tmp_path: Path, repo: str = REPO, *, shards: int = 1, seed: int = 0, **options) -> str:
    folder = tmp_path / f"publish-{repo.replace('/', '--')}-{seed}-{shards}"
    write_checkpoint(folder, shards=shards, seed=seed)
    return hub.add_folder(repo, folder, **options)


def _assert_loaded(module: TinyModule, seed: int = 0) -> None:
    expected = checkpoint_tensors(TinyConfig(), seed=seed)
    torch.testing.assert_close(module.fc.weight, expected["model.fc.weight"], rtol=0, atol=0)
    torch.testing.assert_close(module.embed.weight, expected["model.embed.weight"], rtol=0, atol=0)
    assert module.head.weight is module.embed.weight


# ------------------------------------------------------------------------------------------ name forms


def test_zoo_key_downloads_and_loads(hub, tmp_path, tiny_zoo):
    _publish(hub, tmp_path)
    tiny_zoo("tiny-hub", hub_repo=REPO)
    module = build_encoder("tiny-hub")
    _assert_loaded(module)
    assert is_cached(resolve("tiny-hub").spec)
    paths = [path for _, path in hub.requests]
    assert all(path.startswith(f"/{REPO}/resolve/") for path in paths), hub.requests


def test_hf_hub_name_reads_family_from_config(hub, tmp_path, tiny_zoo):
    _publish(hub, tmp_path)
    module = build_encoder(f"hf-hub:{REPO}")
    assert isinstance(module, TinyModule)
    _assert_loaded(module)


def test_hf_hub_name_at_revision(hub, tmp_path, tiny_zoo):
    first = _publish(hub, tmp_path, seed=1)
    _publish(hub, tmp_path, seed=2)  # main moves on
    _assert_loaded(build_encoder(f"hf-hub:{REPO}@{first}"), seed=1)
    _assert_loaded(build_encoder(f"hf-hub:{REPO}"), seed=2)


def test_local_dir_name(tmp_path, tiny_zoo):
    write_checkpoint(tmp_path / "ckpt", seed=3)
    _assert_loaded(build_encoder(f"local-dir:{tmp_path / 'ckpt'}"), seed=3)


def test_local_dir_without_config(tmp_path):
    with pytest.raises(HubError, match="not a model folder"):
        resolve(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("name", ["hf-hub:no-slash", "hf-hub:a/b/c", "hf-hub:/x", "hf-hub:org/name@"])
def test_malformed_hf_hub_names(name):
    with pytest.raises(HubError, match="hf-hub:ORG/NAME"):
        resolve(name)


def test_entry_without_weights_is_random_init(hub, tiny_zoo):
    tiny_zoo("test-tiny")
    module = build_encoder("test-tiny")
    assert isinstance(module, TinyModule) and not any(p.is_meta for p in module.parameters())
    assert hub.count() == 0
    with pytest.raises(HubError, match="pretrained=False"):
        resolve("test-tiny").file("config.json")


# ------------------------------------------------------------------------------------ cache and offline


def test_download_then_offline_makes_no_request(hub, tmp_path, tiny_zoo, offline_switch):
    _publish(hub, tmp_path)
    tiny_zoo("tiny-hub", hub_repo=REPO)
    build_encoder("tiny-hub")
    offline_switch()
    hub.requests.clear()
    _assert_loaded(build_encoder("tiny-hub"))
    _assert_loaded(build_encoder(f"hf-hub:{REPO}"))
    assert hub.requests == []


def test_offline_subprocess_reads_cache_with_no_request(hub, tmp_path, tiny_zoo):
    commit = _publish(hub, tmp_path)
    download_model(f"hf-hub:{REPO}")
    hub.requests.clear()
    script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from tiny_family import FAMILY
from tinyvlm import registry
registry.register_family(FAMILY)
from tinyvlm.api import build_encoder
module = build_encoder("hf-hub:{REPO}@{commit}")
print(float(module.fc.weight.sum()))
"""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(float(checkpoint_tensors(TinyConfig())["model.fc.weight"].sum()))
    assert hub.requests == []


def test_pinned_commit_in_cache_makes_no_request_online(hub, tmp_path, tiny_zoo):
    commit = _publish(hub, tmp_path)
    tiny_zoo("tiny-pinned", hub_repo=REPO, revision=commit)
    build_encoder("tiny-pinned")
    hub.requests.clear()
    _assert_loaded(build_encoder("tiny-pinned"))
    assert hub.requests == []  # even the absent optional files are remembered for an immutable commit


def test_branch_is_checked_once_then_pinned(hub, tmp_path, tiny_zoo):
    _publish(hub, tmp_path)
    build_encoder(f"hf-hub:{REPO}")
    hub.requests.clear()
    build_encoder(f"hf-hub:{REPO}")
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/main/config.json")]


def test_every_file_is_fetched_at_the_config_commit(hub, tmp_path, tiny_zoo):
    commit = _publish(hub, tmp_path, shards=2)
    build_encoder(f"hf-hub:{REPO}")
    paths = [path for _, path in hub.requests]
    others = [path for path in paths if not path.endswith("/config.json")]
    assert {path for path in paths if path.endswith("/config.json")} == {f"/{REPO}/resolve/main/config.json"}
    assert len(others) >= 4 and all(path.startswith(f"/{REPO}/resolve/{commit}/") for path in others)


def test_revision_pinning_survives_a_moving_branch(hub, tmp_path, tiny_zoo):
    old = _publish(hub, tmp_path, seed=1)
    tiny_zoo("tiny-pinned", hub_repo=REPO, revision=old)
    tiny_zoo("tiny-main", hub_repo=REPO)
    _assert_loaded(build_encoder("tiny-main"), seed=1)
    _publish(hub, tmp_path, seed=2)
    _assert_loaded(build_encoder("tiny-pinned"), seed=1)
    _assert_loaded(build_encoder("tiny-main"), seed=2)


def test_sharded_checkpoint(hub, tmp_path, tiny_zoo, offline_switch):
    _publish(hub, tmp_path, shards=3)
    tiny_zoo("tiny-sharded", hub_repo=REPO)
    spec = resolve("tiny-sharded").spec
    assert not is_cached(spec)
    _assert_loaded(build_encoder("tiny-sharded"))
    shards = {path.rsplit("/", 1)[1] for method, path in hub.requests if method == "GET"}
    assert {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)} <= shards
    assert is_cached(spec)
    offline_switch()
    hub.requests.clear()
    _assert_loaded(build_encoder("tiny-sharded"))
    assert hub.requests == []
    folder = resolve("tiny-sharded").folder
    (folder / "model-00002-of-00003.safetensors").unlink()
    assert not is_cached(spec)


def test_tokenizer_files(hub, tmp_path):
    hub.add(REPO, {"config.json": "{}", "model.safetensors": b"x", "tokenizer.json": "{}", "chat_template.jinja": "t"})
    folder = resolve(f"hf-hub:{REPO}").tokenizer_folder()
    assert {p.name for p in folder.iterdir()} == {"config.json", "tokenizer.json", "chat_template.jinja"}
    hub.add("tiny-org/no-tokenizer", {"config.json": "{}", "model.safetensors": b"x"})
    with pytest.raises(HubError, match="has no tokenizer.json"):
        resolve("hf-hub:tiny-org/no-tokenizer").tokenizer_folder()


# ----------------------------------------------------------------------------------------- error paths


def test_gated_repo_asks_for_access_and_token(hub, tmp_path, tiny_zoo, monkeypatch):
    _publish(hub, tmp_path, token="secret-token")
    tiny_zoo("tiny-gated", hub_repo=REPO, gated=True)
    with pytest.raises(HubError, match=r"is gated: request access at https://huggingface.co/tiny-org/tiny-model") as error:
        build_encoder("tiny-gated")
    assert "HF_TOKEN" in str(error.value)
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    _assert_loaded(build_encoder("tiny-gated"))


def test_repo_not_found_says_check_the_name(hub, tiny_zoo):
    with pytest.raises(HubError, match=r"tiny-org/missing was not found on the Hub.*Check the name"):
        build_encoder("hf-hub:tiny-org/missing")


def test_revision_not_found(hub, tmp_path, tiny_zoo):
    _publish(hub, tmp_path)
    with pytest.raises(HubError, match=r"has no revision 'v9'"):
        build_encoder(f"hf-hub:{REPO}@v9")


def test_repo_without_config(hub, tiny_zoo):
    hub.add(REPO, {"model.safetensors": b"x"})
    with pytest.raises(HubError, match=r"has no config.json"):
        build_encoder(f"hf-hub:{REPO}")


def test_pickle_only_repo_is_refused(hub, tiny_zoo):
    hub.add(REPO, {"config.json": json.dumps(hf_config(TinyConfig())), "pytorch_model.bin": b"pickle"})
    with pytest.raises(WeightsError, match=r"neither model.safetensors nor model.safetensors.index.json.*never pickle"):
        build_encoder(f"hf-hub:{REPO}")
    assert hub.count("pytorch_model.bin") == 0


def test_offline_with_nothing_cached(tiny_zoo):
    tiny_zoo("tiny-hub", hub_repo=REPO)
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE=1 is set. Run `tinyvlm download tiny-hub` while online"):
        build_encoder("tiny-hub")


def test_offline_with_only_the_config_cached(hub, tmp_path, tiny_zoo, offline_switch):
    """`tinyvlm info` fetches config.json alone; a later offline load must say what to download."""
    _publish(hub, tmp_path)
    resolve(f"hf-hub:{REPO}").config_json()
    offline_switch()
    with pytest.raises(HubError, match=rf"model.safetensors of {REPO}@\w+ is not in the local cache.*"
                       rf"Run `tinyvlm download hf-hub:{REPO}` while online"):
        build_encoder(f"hf-hub:{REPO}")


def test_network_failure(tiny_zoo, monkeypatch, isolated_hf_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but the endpoint does not answer
    tiny_zoo("tiny-hub", hub_repo=REPO)
    with pytest.raises(HubError, match=r"cannot be reached. Check your connection and run `tinyvlm download tiny-hub`"):
        build_encoder("tiny-hub")


def test_hub_outage_answers_with_http_status(hub, tiny_zoo, monkeypatch):
    hub.fail_with = 429
    with pytest.raises(HubError) as error:
        build_encoder(f"hf-hub:{REPO}")
    assert "tinyvlm download" in str(error.value)


def test_unknown_zoo_key_is_not_a_hub_error(tiny_zoo):
    tiny_zoo("tiny-hub", hub_repo=REPO)
    with pytest.raises(UnknownModelError, match="tiny-hub"):
        build_encoder("tiny-hbu")


# ---------------------------------------------------------------- offline without HF_HUB_OFFLINE: fail fast


def _really_online_but_unreachable(monkeypatch):
    """HF_HUB_OFFLINE unset, the endpoint refusing connections, and huggingface_hub's real retry waits (the
    autouse fixture skips them; a slow failure must show here)."""
    import time

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(_http, "time", time)


def test_unreachable_hub_fails_fast_and_names_hf_hub_offline(tiny_zoo, monkeypatch):
    import time

    _really_online_but_unreachable(monkeypatch)
    tiny_zoo("tiny-hub", hub_repo=REPO)
    began = time.perf_counter()
    with pytest.raises(HubError, match=r"cannot be reached.*set HF_HUB_OFFLINE=1") as error:
        build_encoder("tiny-hub")
    assert time.perf_counter() - began < 5  # huggingface_hub alone retries for ~25 s
    assert "tinyvlm download tiny-hub" in str(error.value)


def test_unreachable_hub_still_reads_the_cache(hub, tmp_path, tiny_zoo, monkeypatch):
    import time

    from conftest import _point_at

    _publish(hub, tmp_path)
    tiny_zoo("tiny-hub", hub_repo=REPO)
    build_encoder("tiny-hub")  # cached at main
    _really_online_but_unreachable(monkeypatch)
    _point_at(monkeypatch, "http://127.0.0.1:9")
    began = time.perf_counter()
    _assert_loaded(build_encoder("tiny-hub"))
    assert time.perf_counter() - began < 5


def test_cli_offline_without_the_variable_is_one_quick_line(tmp_path):
    import time

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tinyvlm.cli", "download", "hf-hub:tiny-org/tiny-model"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert time.perf_counter() - began < 15
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "Retrying" not in result.stderr


def test_push_to_hub_offline_is_a_hub_error(tmp_path, monkeypatch):
    import tinyvlm

    vlm = tinyvlm.build_vlm("test-siglip", "test-llama")
    with pytest.raises(HubError, match=r"cannot push to me/tiny: HF_HUB_OFFLINE=1 is set. Nothing was uploaded"):
        vlm.push_to_hub("me/tiny")
    _really_online_but_unreachable(monkeypatch)
    with pytest.raises(HubError, match=r"cannot push to me/tiny: the Hub at http://127.0.0.1:9 cannot be reached"):
        vlm.push_to_hub("me/tiny")
