"""Pixel-shuffle projectors: the SmolVLM / nanoVLM connector and LLaVA's MLP.

A projector maps the encoder's patch tokens ``[B, h * w, D]`` (row-major grid) into the decoder's embedding
space ``[B, (h / s) * (w / s), d]``:

1. **pixel shuffle** by a factor ``s`` (space-to-depth, Shukor et al. / SmolVLM, arXiv:2504.05299): each
   ``s x s`` block of neighbouring patches becomes one token of width ``s * s * D``, so the image costs
   ``s**2`` times fewer decoder positions;
2. a **head**: one bias-free Linear (``pixel-shuffle-linear``, nanoVLM's ``ModalityProjector``) or a two-layer
   GELU MLP (``pixel-shuffle-mlp``; with ``s = 1`` this is LLaVA-1.5's ``mlp`` projector).

The channel order inside a shuffled token follows nanoVLM: the grid ``[h, w]`` is split into
``[h/s, s, w/s, s]`` and the two ``s`` axes move behind the grid axes, so token ``(i, j)`` concatenates
the patches ``(i*s + a, j*s + b)`` for ``a`` (outer) then ``b`` (inner), each ``D`` channels wide.
SmolVLM / Idefics3's connector reaches the same order by other views and transposes on the square grids
it accepts (checked against transformers in ``tests/formats/test_smolvlm.py``); another project's order
would be one more entry of `SHUFFLE_ORDERS`.

**Default factor** (``factor=None``): chosen from the encoder's grid at the training resolution by
`default_factor`: the largest ``s`` in (4, 2, 1) that divides both sides of the grid and keeps at least
``MIN_TOKENS = 49`` (7 x 7) tokens. This reproduces nanoVLM (14 x 14 patches at 224/16 -> 2, 49 tokens;
32 x 32 at 512/16 -> 4, 64 tokens) and is valid for every grid (``s = 1`` always divides).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

from pydantic import Field, field_validator
from torch import Tensor, nn

from tinyvlm.config import Config, check_activation
from tinyvlm.errors import ConfigError
from tinyvlm.layers import MLP
from tinyvlm.registry import Family, register_family, register_model

#: Factors tried by the default rule, largest first.
DEFAULT_FACTORS = (4, 2, 1)
#: The default factor keeps at least this many tokens per image (nanoVLM's 224-px model has 7 x 7 = 49).
MIN_TOKENS = 49


def valid_factors(grid: tuple[int, int]) -> list[int]:
    """Every factor that divides both sides of ``grid`` (rows, columns), ascending."""
    h, w = grid
    return [s for s in range(1, min(h, w) + 1) if h % s == 0 and w % s == 0]


def default_factor(grid: tuple[int, int]) -> int:
    """The largest of (4, 2, 1) that divides ``grid`` and keeps at least `MIN_TOKENS` tokens (else 1)."""
    h, w = grid
    for s in DEFAULT_FACTORS:
        if h % s == 0 and w % s == 0 and (h // s) * (w // s) >= MIN_TOKENS:
            return s
    return 1


def check_factor(factor: int, grid: tuple[int, int], *, what: str = "the encoder grid") -> None:
    """A `ConfigError` naming the factors that would work when ``factor`` does not divide ``grid``."""
    h, w = grid
    if h % factor or w % factor:
        raise ConfigError(
            f"pixel-shuffle factor {factor} does not divide {what} of {h}x{w} patches; "
            f"factors that would: {', '.join(map(str, valid_factors(grid)))}"
        )


def shuffle_nanovlm(x: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """nanoVLM's pixel shuffle: ``[B, h*w, D] -> [B, (h/s)*(w/s), s*s*D]`` (channel order in the module doc)."""
    b, n, d = x.shape
    h, w = grid
    x = x.reshape(b, h // s, s, w // s, s, d)
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, h/s, w/s, s, s, D]
    return x.reshape(b, (h // s) * (w // s), s * s * d)


#: Pixel-shuffle channel orders by name; another project's order is one more entry here.
SHUFFLE_ORDERS: dict[str, Callable[[Tensor, tuple[int, int], int], Tensor]] = {"nanovlm": shuffle_nanovlm}


class PixelShuffleConfig(Config):
    """A pixel shuffle by ``factor`` followed by a Linear or a two-layer MLP head.

    ``in_dim`` (the encoder's token width ``D``) and ``out_dim`` (the decoder's hidden size) are filled in by
    `tinyvlm.build_projector` / `tinyvlm.build_vlm`. ``factor=None`` means the default rule of
    `default_factor`, resolved by `build_vlm` from the encoder's grid.
    """

    family: ClassVar[str] = "pixel-shuffle"

    in_dim: int | None = Field(None, ge=1)
    out_dim: int | None = Field(None, ge=1)
    factor: int | None = Field(None, ge=1)
    #: ``linear``: one Linear (nanoVLM / SmolVLM); ``mlp``: Linear -> activation -> Linear (LLaVA).
    head: Literal["linear", "mlp"] = "mlp"
    #: Width of the MLP's hidden layer; None = ``out_dim`` (as LLaVA-1.5).
    hidden_dim: int | None = Field(None, ge=1)
    bias: bool = True
    act: str = "gelu"
    order: Literal["nanovlm"] = "nanovlm"

    @field_validator("act")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        return check_activation(value)

    def resolved(self) -> "PixelShuffleConfig":
        """This config checked as complete enough to build a module."""
        missing = [name for name in ("in_dim", "out_dim") if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"pixel-shuffle projector needs {' and '.join(missing)} (build_projector passes them)")
        if self.factor is None:
            raise ConfigError(
                "pixel-shuffle factor is None ('choose from the encoder grid'), which only build_vlm can resolve; "
                "to build the projector alone pass factor=N, e.g. build_projector(name, in_dim=..., out_dim=..., factor=2)"
            )
        return self


class PixelShuffleProjector(nn.Module):
    """``projector(features[B, h*w, D], grid=(h, w)) -> [B, (h/s)*(w/s), out_dim]``."""

    def __init__(self, config: PixelShuffleConfig) -> None:
        super().__init__()
        self.config = config.resolved()
        self.factor: int = config.factor  # type: ignore[assignment]
        self.shuffle = SHUFFLE_ORDERS[config.order]
        width = config.in_dim * self.factor**2  # type: ignore[operator]
        if config.head == "linear":
            self.proj = nn.Linear(width, config.out_dim, bias=config.bias)  # type: ignore[arg-type]
        else:
            self.mlp = MLP(width, config.hidden_dim or config.out_dim, config.act, bias=config.bias, out_dim=config.out_dim)
        self.reset_parameters()

    @property
    def dim(self) -> int:
        return int(self.config.out_dim)  # type: ignore[arg-type]

    def reset_parameters(self) -> None:
        """nanoVLM's initialisation: weights N(0, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def tokens_per_image(self, grid: tuple[int, int]) -> int:
        check_factor(self.factor, grid)
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        if features.shape[1] != grid[0] * grid[1]:
            raise ConfigError(f"projector got {features.shape[1]} tokens for a {grid[0]}x{grid[1]} grid")
        if features.shape[-1] != self.config.in_dim:
            raise ConfigError(f"projector expects tokens of width {self.config.in_dim}, got {features.shape[-1]}")
        check_factor(self.factor, grid)
        x = self.shuffle(features, grid, self.factor) if self.factor > 1 else features
        return self.proj(x) if self.config.head == "linear" else self.mlp(x)


register_family(Family(name="pixel-shuffle", kind="projector", config_cls=PixelShuffleConfig, build=PixelShuffleProjector))

# ------------------------------------------------------------------------------------------------- zoo

register_model(
    "pixel-shuffle-linear",
    family="pixel-shuffle",
    config=PixelShuffleConfig(head="linear", bias=False),
    license="apache-2.0",
    description="Pixel shuffle then one bias-free Linear: the nanoVLM / SmolVLM connector (the default projector)",
)
register_model(
    "pixel-shuffle-mlp",
    family="pixel-shuffle",
    config=PixelShuffleConfig(head="mlp"),
    license="apache-2.0",
    description="Pixel shuffle then a 2-layer GELU MLP (does not export to transformers)",
)
register_model(
    "mlp",
    family="pixel-shuffle",
    config=PixelShuffleConfig(head="mlp", factor=1),
    license="apache-2.0",
    description="LLaVA-1.5's 2-layer GELU MLP, one token per patch (no shuffle)",
)
