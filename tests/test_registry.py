"""The zoo registry: the contract every entry meets, the index's freshness, lookups and their errors, and
that listing stays torch-free."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from tiny_family import TinyConfig

from tinyvlm import registry
from tinyvlm.errors import ConfigError, UnknownModelError
from tinyvlm.registry import KINDS, get_family, get_spec, list_models

SPECS = list_models()


def test_zoo_is_not_empty():
    assert {spec.kind for spec in SPECS} >= {"encoder", "decoder", "projector"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.key)
def test_entry_contract(spec):
    assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", spec.key)
    assert spec.kind in KINDS
    family = get_family(spec.family)
    assert family.kind == spec.kind
    config = spec.config
    assert isinstance(config, family.config_cls)
    assert type(config).model_validate_json(config.model_dump_json()) == config  # JSON round trip
    assert config.model_dump(mode="json") == spec.config_json, "stale zoo.json: run `python -m tinyvlm.registry --write`"
    if spec.kind in ("encoder", "decoder"):
        assert isinstance(spec.params, int) and spec.params > 0
        assert isinstance(spec.dim, int) and spec.dim > 0
    assert spec.license and spec.description and "\n" not in spec.description
    if spec.hub_repo is not None:
        assert re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec.hub_repo), spec.hub_repo
        assert family.key_map is not None, "an entry with weights needs a family that can read them"
    else:  # nothing of its own to download: nothing to pin, and gated only through a recipe's parts
        assert spec.revision is None and (not spec.gated or spec.kind == "vlm")
    if spec.revision is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", spec.revision), "pin revisions to full commit hashes"
    assert get_spec(spec.key) == spec


@pytest.mark.parametrize("spec", list_models(kind="vlm"), ids=lambda spec: spec.key)
def test_vlm_is_gated_when_a_part_it_downloads_is(spec):
    """A recipe downloads its encoder and decoder: `list-models` calls it gated when either is (DINOv3 +
    Gemma-3: both). A trained VLM downloads its own repo only."""
    keys = {s.key for s in SPECS}
    config = spec.config
    parts = [] if spec.trained else [get_spec(name) for name in (config.encoder, config.decoder) if name in keys]
    assert spec.gated == any(part.gated for part in parts) or (spec.trained and spec.gated)
    if spec.key == "dinov3-gemma3-270m":
        assert spec.gated and all(part.gated for part in parts)


def test_list_models_shows_a_gated_recipe_as_gated():
    out = subprocess.run([sys.executable, "-m", "tinyvlm.cli", "list-models", "dinov3-gemma3-270m", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[0]["gated"] is True


def test_index_is_fresh():
    """zoo.json (read by `list-models` without importing torch) must equal what the family modules register."""
    registry.load_families()
    live = [registry._spec_of(entry, None).to_json() for entry in registry._ENTRIES.values()]
    live.sort(key=lambda row: registry._natural_key(row["key"]))
    indexed = json.loads(registry.INDEX_PATH.read_text())
    stale = sorted({row["key"] for row in live}.symmetric_difference(row["key"] for row in indexed))
    stale += [row["key"] for row, old in zip(live, indexed) if row != old and row["key"] == old["key"]]
    assert live == indexed, (
        f"src/tinyvlm/zoo.json is out of date ({', '.join(sorted(set(stale))) or 'order'}): "
        "run `python -m tinyvlm.registry --write` and commit it"
    )


def test_duplicates_raise(tiny_zoo):
    from tiny_family import FAMILY

    tiny_zoo("tiny-a")
    with pytest.raises(ConfigError, match="'tiny-a' is already registered"):
        tiny_zoo("tiny-a")
    with pytest.raises(ConfigError, match="family 'tiny' is already registered"):
        registry.register_family(FAMILY)


@pytest.mark.parametrize("key", ["Tiny-A", "tiny_a", "-tiny", "tiny a", ""])
def test_key_format(tiny_zoo, key):
    with pytest.raises(ConfigError, match="kebab case"):
        tiny_zoo(key)


def test_entry_needs_its_family_and_config_type(tiny_zoo):
    with pytest.raises(ConfigError, match="register family 'nope' before"):
        registry.register_model("tiny-x", family="nope", config=TinyConfig(), license="x", description="x")
    from tiny_family import TinyRecipeConfig

    with pytest.raises(ConfigError, match="config must be a TinyConfig"):
        tiny_zoo("tiny-x", config=TinyRecipeConfig(encoder="a", decoder="b"))


def test_unknown_key_suggests_close_ones(tiny_zoo):
    for key in ("tiny-base", "tiny-large", "other"):
        tiny_zoo(key)
    with pytest.raises(UnknownModelError) as error:
        get_spec("tiny-bsae")
    message = str(error.value)
    assert message.startswith("unknown model 'tiny-bsae'. Did you mean 'tiny-base'")
    assert "tinyvlm list-models" in message
    with pytest.raises(UnknownModelError, match=r"unknown encoder 'zzz'. See `tinyvlm list-models --kind encoder`"):
        get_spec("zzz", kind="encoder")


def test_wrong_kind_says_what_it_is(tiny_zoo):
    tiny_zoo("tiny-dec", family="tiny-decoder")
    with pytest.raises(UnknownModelError, match=r"'tiny-dec' is a decoder, not an encoder"):
        get_spec("tiny-dec", kind="encoder")
    assert get_spec("tiny-dec", kind="decoder").family == "tiny-decoder"


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("google/siglip-base-patch16-224", "'hf-hub:google/siglip-base-patch16-224'"),
        ("./ckpt/my-model", "'local-dir:./ckpt/my-model'"),
        ("~/models/x", "'local-dir:~/models/x'"),
    ],
)
def test_path_like_bare_names_point_to_the_prefixes(name, hint):
    with pytest.raises(UnknownModelError, match=re.escape(hint)):
        get_spec(name)


def test_fnmatch_and_natural_sort(tiny_zoo):
    for key in ("tiny-10", "tiny-2", "tiny-1b", "tiny-1", "other-3"):
        tiny_zoo(key)
    assert [s.key for s in list_models()] == ["other-3", "tiny-1", "tiny-1b", "tiny-2", "tiny-10"]
    assert [s.key for s in list_models("tiny-?")] == ["tiny-1", "tiny-2"]
    assert [s.key for s in list_models("TINY-1*")] == ["tiny-1", "tiny-1b", "tiny-10"]
    assert [s.key for s in list_models("*-[23]")] == ["tiny-2", "other-3"][::-1]
    assert list_models("tiny-*", kind="decoder") == []
    with pytest.raises(ConfigError, match="unknown kind 'encoders'"):
        list_models(kind="encoders")


def test_spec_config_is_validated_copy(tiny_zoo):
    tiny_zoo("tiny-a", config=TinyConfig(dim=4))
    config = get_spec("tiny-a").config
    assert config == TinyConfig(dim=4)
    assert config.replace(dim=6).dim == 6 and get_spec("tiny-a").config.dim == 4


@pytest.mark.parametrize(
    "code",
    [
        "import tinyvlm; tinyvlm.list_models(); tinyvlm.get_spec(tinyvlm.list_models()[0].key)",
        "from tinyvlm.cli import main; main(['list-models']); main(['list-models', '--json'])",
        "from tinyvlm.cli import main; import tinyvlm; main(['info', tinyvlm.list_models()[0].key])",
        "import tinyvlm.vlm.config, tinyvlm.training.config, tinyvlm.sources; tinyvlm.sources.resolve('test-vlm')",
        "from tinyvlm.cli import build_parser, _subparsers; _subparsers(build_parser(command='train'))['train'].format_help()",
    ],
    ids=["import", "list-models", "info", "config-modules", "train-help"],
)
def test_listing_does_not_import_torch(code):
    check = f"import sys\n{code}\nassert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


USER_ZOO = f"""
import sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
import tinyvlm

shipped = {{spec.key for spec in tinyvlm.list_models()}}
assert "test-llama" in shipped and "torch" not in sys.modules, "listing the shipped zoo imports no torch"

from tiny_family import FAMILY, TinyConfig  # a user's own family (its module imports torch)

tinyvlm.register_family(FAMILY)
try:
    tinyvlm.register_model("test-llama", family="tiny", config=TinyConfig(), license="mit", description="taken")
except tinyvlm.ConfigError as error:
    print("refused:", error)
tinyvlm.register_model("my-tiny", family="tiny", config=TinyConfig(dim=6), license="mit", description="mine")
tinyvlm.register_model(
    "my-vlm", family="vlm", license="mit", description="a recipe of my own",
    config=tinyvlm.get_spec("test-vlm").config.replace(decoder="test-gemma3"),
)
keys = [spec.key for spec in tinyvlm.list_models()]
assert {{"my-tiny", "my-vlm"}} <= set(keys) and shipped <= set(keys), keys
assert [spec.key for spec in tinyvlm.list_models("my-*", kind="encoder")] == ["my-tiny"]
spec = tinyvlm.get_spec("my-tiny")
assert (spec.kind, spec.family, spec.license, spec.dim, spec.config) == ("encoder", "tiny", "mit", 6, TinyConfig(dim=6))
assert spec.params == sum(p.numel() for p in tinyvlm.build_encoder("my-tiny").parameters())
assert tinyvlm.get_spec("my-vlm", kind="vlm").description == "a recipe of my own"
vlm = tinyvlm.build_vlm("my-vlm", pretrained=False)
assert type(vlm.decoder).__name__ == "Gemma3" and vlm.config.decoder == "test-gemma3"

from tinyvlm.cli import main
main(["list-models", "my-*"])
main(["info", "my-tiny"])
"""


def test_user_registrations_are_listed_described_and_built_like_shipped_entries():
    """The user's path, in a fresh process: nothing loaded but what the user imports. Shipped entries list
    without torch; entries registered at run time are listed, looked up, described and built like them."""
    result = subprocess.run([sys.executable, "-c", USER_ZOO], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[:3] for line in result.stdout.splitlines() if line.startswith("my-")]
    assert listed == [["my-tiny", "encoder", "tiny"], ["my-vlm", "vlm", "vlm"]]  # list-models shows both
    assert '"dim": 6' in result.stdout  # info describes it
    assert "refused: zoo key 'test-llama' is a shipped llama entry; register yours under another key" in result.stdout
