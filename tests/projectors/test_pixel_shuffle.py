"""Pixel-shuffle projectors: the shuffle against a direct reference, the heads, the factor rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tinyvlm
from tinyvlm.errors import ConfigError
from tinyvlm.projectors.pixel_shuffle import (
    PixelShuffleConfig,
    PixelShuffleProjector,
    default_factor,
    shuffle_nanovlm,
    valid_factors,
)


def reference_shuffle(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """nanoVLM's order written out token by token: token (i, j) concatenates patches (i*s + a, j*s + b),
    ``a`` outer, ``b`` inner, each D channels."""
    b, _, d = x.shape
    h, w = grid
    rows = []
    for i in range(h // s):
        for j in range(w // s):
            parts = [x[:, (i * s + a) * w + (j * s + c)] for a in range(s) for c in range(s)]
            rows.append(torch.cat(parts, dim=-1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("grid, s", [((4, 4), 2), ((4, 6), 2), ((6, 4), 2), ((8, 12), 4), ((3, 5), 1), ((6, 9), 3)])
def test_shuffle_matches_direct_reference(grid: tuple[int, int], s: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, grid[0] * grid[1], 5)
    out = shuffle_nanovlm(x, grid, s)
    assert out.shape == (2, (grid[0] // s) * (grid[1] // s), 5 * s * s)
    torch.testing.assert_close(out, reference_shuffle(x, grid, s), rtol=0, atol=0)


def test_shuffle_keeps_neighbours_together() -> None:
    """On a 2x4 grid with s=2, the first token holds patches 0, 1 (row 0) then 4, 5 (row 1)."""
    x = torch.arange(8.0).view(1, 8, 1)
    out = shuffle_nanovlm(x, (2, 4), 2)
    assert out.tolist() == [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]


def _projector(head: str, factor: int, *, bias: bool = True) -> PixelShuffleProjector:
    torch.manual_seed(0)
    config = PixelShuffleConfig(in_dim=6, out_dim=10, factor=factor, head=head, bias=bias)  # type: ignore[arg-type]
    projector = PixelShuffleProjector(config)
    for p in projector.parameters():  # biases start at 0: randomise so that ignoring them fails
        p.data.normal_()
    return projector


def test_linear_head_is_one_linear_after_the_shuffle() -> None:
    projector = _projector("linear", 2, bias=False)
    assert [name for name, _ in projector.named_parameters()] == ["proj.weight"]
    x = torch.randn(3, 24, 6)
    expected = reference_shuffle(x, (4, 6), 2) @ projector.proj.weight.T
    torch.testing.assert_close(projector(x, (4, 6)), expected)


def test_mlp_head_is_gelu_mlp_after_the_shuffle() -> None:
    projector = _projector("mlp", 2)
    x = torch.randn(3, 24, 6)
    shuffled = reference_shuffle(x, (6, 4), 2)
    hidden = F.gelu(shuffled @ projector.mlp.fc1.weight.T + projector.mlp.fc1.bias)
    expected = hidden @ projector.mlp.fc2.weight.T + projector.mlp.fc2.bias
    torch.testing.assert_close(projector(x, (6, 4)), expected)


def test_factor_one_is_a_plain_mlp() -> None:
    projector = _projector("mlp", 1)
    x = torch.randn(2, 15, 6)
    assert projector(x, (3, 5)).shape == (2, 15, 10)
    assert projector.tokens_per_image((3, 5)) == 15


def test_bad_factor_names_the_factors_that_would_work() -> None:
    projector = _projector("mlp", 4)
    with pytest.raises(ConfigError, match=r"factor 4 does not divide .* 6x9 .*: 1, 3"):
        projector(torch.randn(1, 54, 6), (6, 9))


def test_token_count_and_width_are_checked() -> None:
    projector = _projector("mlp", 2)
    with pytest.raises(ConfigError, match="16 tokens for a 4x6 grid"):
        projector(torch.randn(1, 16, 6), (4, 6))
    with pytest.raises(ConfigError, match="width 6, got 7"):
        projector(torch.randn(1, 16, 7), (4, 4))


def test_valid_and_default_factors() -> None:
    assert valid_factors((6, 9)) == [1, 3]
    assert default_factor((14, 14)) == 2  # nanoVLM-222M: 224 / 16 -> 49 tokens
    assert default_factor((32, 32)) == 4  # nanoVLM-460M: 512 / 16 -> 64 tokens
    assert default_factor((27, 27)) == 1  # so400m 384 / 14: neither 2 nor 4 divides
    assert default_factor((8, 8)) == 1  # 4 or 2 would leave fewer than 49 tokens
    assert default_factor((16, 24)) == 2  # rectangular: 4 leaves 4 x 6 = 24 < 49


@pytest.mark.parametrize("spec", tinyvlm.list_models(kind="encoder"), ids=lambda s: s.key)
def test_default_factor_is_valid_for_every_zoo_encoder(spec: tinyvlm.ModelSpec) -> None:
    from tinyvlm.registry import get_family

    family = get_family(spec.family)
    with torch.device("meta"):
        encoder = family.build(spec.config)
    grid = encoder.grid_size(encoder.image_size, encoder.image_size)
    s = default_factor(grid)
    assert grid[0] % s == 0 and grid[1] % s == 0
    assert s == 1 or (grid[0] // s) * (grid[1] // s) >= 49


@pytest.mark.parametrize("key", ["pixel-shuffle-linear", "pixel-shuffle-mlp", "mlp"])
def test_zoo_projectors_build_through_the_factory(key: str) -> None:
    spec = tinyvlm.get_spec(key)
    assert spec.kind == "projector"
    factor = {"mlp": {}}.get(key, {"factor": 2})
    projector = tinyvlm.build_projector(key, in_dim=8, out_dim=12, **factor)
    out = projector(torch.randn(2, 16, 8), (4, 4))
    assert out.shape == (2, 16 if key == "mlp" else 4, 12)
    assert projector.dim == 12


def test_auto_factor_cannot_build_alone() -> None:
    with pytest.raises(ConfigError, match="only build_vlm can resolve"):
        tinyvlm.build_projector("pixel-shuffle-mlp", in_dim=8, out_dim=12)
