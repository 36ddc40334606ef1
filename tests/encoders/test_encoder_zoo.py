"""Every encoder zoo entry: instantiates on the meta device with its real config, has the reference model's
parameter count, reads back from the equivalent ``config.json``, and carries its official preprocessing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import tinyvlm
from tinyvlm.registry import get_family

transformers = pytest.importorskip("transformers")

ENCODERS = tinyvlm.list_models(kind="encoder")
EXPECTED_KEYS = {
    "siglip-b16-224", "siglip-b16-256", "siglip-b16-384", "siglip-b16-512", "siglip-so400m-p14-384",
    "siglip2-b16-224", "siglip2-b16-256", "siglip2-b16-384", "siglip2-b16-512",
    "dinov3-vits16", "dinov3-vits16plus", "dinov3-vitb16", "dinov3-vitl16", "test-siglip", "test-dinov3",
}  # fmt: skip


def test_zoo_keys():
    assert {spec.key for spec in ENCODERS} == EXPECTED_KEYS


def _hf_config(spec) -> dict:
    """The ``config.json`` transformers would write for this entry (SigLIP: a dual-tower SiglipModel file)."""
    fields = spec.config.model_dump()
    if spec.family == "siglip":
        vision = {k: v for k, v in fields.items() if k != "resample"}
        vocab = 256000 if spec.key.startswith("siglip2") else 32000
        return transformers.SiglipConfig(vision_config=vision, text_config={"vocab_size": vocab}).to_dict()
    return transformers.DINOv3ViTConfig(**fields).to_dict()


def _reference_params(spec) -> int:
    """Parameters of the reference model built on the meta device, less what tinyvlm declares unused
    (SigLIP's attention-pooling head, DINOv3's pretraining-only mask token)."""
    fields = spec.config.model_dump()
    with torch.device("meta"):
        if spec.family == "siglip":
            vision = {k: v for k, v in fields.items() if k != "resample"}
            model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
            unused = ("head.",)
        else:
            model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**fields))
            unused = ("embeddings.mask_token",)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(unused))


@pytest.mark.parametrize("spec", ENCODERS, ids=lambda spec: spec.key)
def test_meta_instantiation_matches_reference(spec):
    with torch.device("meta"):
        encoder = get_family(spec.family).build(spec.config)
    params = sum(p.numel() for p in encoder.parameters())
    assert params == spec.params == _reference_params(spec)
    assert encoder.dim == spec.dim
    assert encoder.image_transform.size == (spec.config.image_size,) * 2


@pytest.mark.parametrize("spec", ENCODERS, ids=lambda spec: spec.key)
def test_from_hf_round_trip(spec):
    """Reading the entry's config.json gives the entry's config (the SigLIP2 resize filter included)."""
    assert get_family(spec.family).config_cls.from_hf(_hf_config(spec)) == spec.config


@pytest.mark.parametrize("spec", ENCODERS, ids=lambda spec: spec.key)
def test_spec_metadata(spec):
    if spec.key.startswith("test-"):
        assert spec.hub_repo is None and not spec.gated
        return
    assert spec.hub_repo is not None
    if spec.family == "dinov3":
        assert spec.hub_repo.startswith("facebook/dinov3-") and spec.hub_repo.endswith("-pretrain-lvd1689m")
        assert spec.gated and spec.license == "dinov3-license" and "gated" in spec.description
    else:
        assert spec.hub_repo.startswith("google/siglip") and not spec.gated and spec.license == "apache-2.0"


@pytest.mark.parametrize("spec", ENCODERS, ids=lambda spec: spec.key)
def test_preprocessing_per_checkpoint(spec):
    with torch.device("meta"):
        encoder = get_family(spec.family).build(spec.config)
    t = encoder.image_transform
    if spec.family == "dinov3":
        assert (t.resample, t.mean, t.std, t.backend) == (
            Image.Resampling.BILINEAR, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "torch")
    else:
        resample = Image.Resampling.BILINEAR if spec.key.startswith("siglip2") else Image.Resampling.BICUBIC
        assert (t.resample, t.mean, t.std, t.backend) == (resample, (0.5,) * 3, (0.5,) * 3, "pil")


@pytest.mark.parametrize("key", [s.key for s in ENCODERS if s.gated])
def test_gated_entry_says_how_to_get_access(hub, key):
    """A user without access to a gated repo (DINOv3) is told to request it and set a token."""
    spec = tinyvlm.get_spec(key)
    hub.add(spec.hub_repo, {"config.json": "{}"}, token="granted-token")
    with pytest.raises(tinyvlm.HubError, match=rf"{spec.hub_repo} is gated: request access at .*HF_TOKEN"):
        tinyvlm.build_encoder(key)


@pytest.mark.parametrize("key", ["test-siglip", "test-dinov3"])
def test_compiles_without_graph_breaks(key):
    """``torch.compile(fullgraph=True)`` captures the whole forward, at the training size and another one.
    (The eager backend keeps this fast; inductor itself was checked by hand, see docs/encoders.md.)"""
    encoder = tinyvlm.build_encoder(key)
    compiled = torch.compile(encoder, backend="eager", fullgraph=True)
    with torch.no_grad():
        for size in [(64, 64), (48, 80)]:
            pixels = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(pixels), encoder(pixels))
