"""The mix-and-match VLM: any encoder + a projector + any decoder, its config, recipes, save / load / push.

``build_vlm("dinov3-vits16plus", "gemma-3-270m-it")`` loads both backbones, initialises the projector
(pixel-shuffle factor from the encoder's grid unless given), adds the image tokens to the decoder's
tokenizer (growing the vocabulary only for tokens that are embedded like text: the tile markers of image
splitting; the per-feature ``<|image|>`` token never has its row looked up) and records everything it
resolved in a `VLMConfig`, so that `load_vlm` rebuilds the model offline from ``config.json``.

Forward (LLaVA / nanoVLM style): ``embeds = decoder.embed(input_ids)`` (the family's own scaling, e.g.
Gemma's sqrt(hidden), applies to text only); the positions holding the image token are replaced by the
projected image features, in order; the decoder runs on those embeddings.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from tinyvlm.config import Config
from tinyvlm.errors import ConfigError, DataError, HubError, TinyVLMError
from tinyvlm.processor import IGNORE_INDEX, ImageTokenConfig, Processor, is_single_prompt
from tinyvlm.projectors.pixel_shuffle import PixelShuffleConfig, check_factor, default_factor
from tinyvlm.registry import Family, get_config, get_family, register_family, register_model

#: Version of the config.json layout written by `VLM.save_pretrained`.
SCHEMA_VERSION = 1
MODEL_TYPE = "tinyvlm"


class TrainingDefaults(Config):
    """Training settings a recipe suggests (nanoVLM's ``TrainConfig``); `tinyvlm.train` reads them as defaults.
    A learning rate of 0 freezes that part."""

    family: ClassVar[str] = "training-defaults"

    lr_projector: float = Field(5.12e-3, ge=0)
    lr_encoder: float = Field(5e-5, ge=0)
    lr_decoder: float = Field(5e-5, ge=0)
    batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(4096, ge=1)


class PartRecord(Config):
    """One built part: its family, the Hub commit its weights came from (None: random init or a local
    folder) and its full config, enough to rebuild it without the zoo or the network."""

    family: ClassVar[str] = "part"

    family_name: str
    revision: str | None = None
    config: dict[str, Any]


class BuiltParts(Config):
    """What `build_vlm` resolved: the three parts and the image-token ids of the saved tokenizer."""

    family: ClassVar[str] = "parts"

    encoder: PartRecord
    decoder: PartRecord
    projector: PartRecord
    image_token_id: int
    marker_token_ids: list[int] = []


class VLMConfig(Config):
    """A VLM: which encoder, decoder and projector (names and config overrides), the image-token settings and
    training defaults. ``parts`` is filled in by `build_vlm` with what it actually built; a recipe has none.

    Edit a recipe with ``replace`` and pass it to `build_vlm`::

        config = tinyvlm.get_spec("dinov3-gemma3-270m").config
        vlm = tinyvlm.build_vlm(config.replace(projector="pixel-shuffle-mlp"))
    """

    family: ClassVar[str] = "vlm"

    model_type: Literal["tinyvlm"] = MODEL_TYPE
    schema_version: int = SCHEMA_VERSION
    encoder: str
    decoder: str
    projector: str = "pixel-shuffle-mlp"
    encoder_kwargs: dict[str, Any] = {}
    decoder_kwargs: dict[str, Any] = {}
    projector_kwargs: dict[str, Any] = {}
    image_tokens: ImageTokenConfig = ImageTokenConfig()
    training: TrainingDefaults = TrainingDefaults()
    parts: BuiltParts | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: int) -> int:
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"written by a newer tinyvlm (schema {version}; this one reads up to {SCHEMA_VERSION}): "
                "upgrade tinyvlm (pip install -U tinyvlm)"
            )
        return version

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "VLMConfig":
        """A saved VLM's ``config.json`` is the config itself."""
        return cls.validate_dict(hf_config, context="VLM config.json")  # type: ignore[return-value]


@dataclass
class VLMOutput:
    """``loss``: mean cross-entropy over the labelled positions (None without labels); ``num_labels``: how
    many there were (to weight micro-batches); ``logits`` ``[B, T, V]`` are computed when first read, so a
    training step that needs only the loss never materialises them."""

    loss: Tensor | None
    num_labels: int
    hidden: Tensor
    head: Callable[[Tensor], Tensor]
    _logits: Tensor | None = None

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits


class VLM(nn.Module):
    """``encoder`` -> ``projector`` -> ``decoder``, with the ``tokenizer`` and its `Processor`."""

    def __init__(
        self, config: VLMConfig, encoder: nn.Module, projector: nn.Module, decoder: nn.Module, tokenizer: Any = None
    ) -> None:
        super().__init__()
        if config.parts is None:
            raise ConfigError("a VLM needs a config with resolved parts; build it with tinyvlm.build_vlm")
        self.config = config
        self.encoder = encoder
        self.projector = projector
        self.decoder = decoder
        self.tokenizer = tokenizer
        self._processor: Processor | None = None

    @classmethod
    def from_config(cls, config: VLMConfig) -> "VLM":
        """Build the modules (random init, on the current default device: ``torch.device("meta")`` before
        loading weights). A recipe (no ``parts``) is resolved from the zoo, offline, without a tokenizer
        (so without vocabulary growth)."""
        if config.parts is not None:
            encoder = _build_part(config.parts.encoder)
            decoder = _build_part(config.parts.decoder)
            projector_config = PixelShuffleConfig.validate_dict(config.parts.projector.config, context="projector")
            projector = _projector(config, projector_config, encoder, decoder)
            return cls(config, encoder, projector, decoder)
        encoder = _zoo_part(config.encoder, "encoder", config.encoder_kwargs)
        decoder = _zoo_part(config.decoder, "decoder", config.decoder_kwargs)
        projector = _projector(config, _projector_base(config), encoder, decoder)
        parts = BuiltParts(
            encoder=_record(encoder, None),
            decoder=_record(decoder, None),
            projector=_record(projector, None),
            image_token_id=-1,  # no tokenizer: ids unknown
        )
        return cls(config.replace(parts=parts), encoder, projector, decoder)

    # ----------------------------------------------------------------------------------------- basics

    @property
    def dim(self) -> int:
        return self.decoder.dim

    @property
    def image_token_id(self) -> int:
        return self.config.parts.image_token_id  # type: ignore[union-attr]

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def image_grid(self) -> tuple[int, int]:
        """The encoder's patch grid for one view at its training resolution."""
        size = self.encoder.image_size
        return self.encoder.grid_size(size, size)

    @property
    def processor(self) -> Processor:
        """Prompts + images -> model inputs with this model's tokenizer, image tokens and preprocessing."""
        if self.tokenizer is None:
            raise ConfigError("this VLM has no tokenizer (built from a bare config); use build_vlm or load_vlm")
        if self._processor is None or self._processor.tokenizer is not self.tokenizer:
            stops = self.decoder.config.eos_token_ids
            self._processor = Processor(
                self.tokenizer,
                self.encoder.preprocess,
                tokens=self.config.image_tokens,
                image_size=self.encoder.image_size,
                tokens_per_view=self.projector.tokens_per_image(self.image_grid),
                eos_token_id=stops[0] if stops else self.tokenizer.eos_token_id,
                max_length=self.decoder.config.max_position_embeddings,
            )
        return self._processor

    # ---------------------------------------------------------------------------------------- forward

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """``[V, 3, H, W]`` views -> projected features ``[V, tokens per view, decoder dim]``."""
        encoder_dtype = next(self.encoder.parameters()).dtype
        tokens = self.encoder(pixel_values.to(device=self.device, dtype=encoder_dtype))
        grid = self.encoder.grid_size(*pixel_values.shape[-2:])
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(tokens.to(projector_dtype), grid)

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """The decoder's input embeddings with the image-token positions replaced by the image features
        (row-major: the features of ``pixel_values`` fill the image tokens in the order they appear)."""
        image_mask = input_ids == self.image_token_id
        embeds = self.decoder.embed(input_ids.masked_fill(image_mask, 0))  # row 0 is overwritten below
        count = int(image_mask.sum())
        if pixel_values is None:
            if count:
                raise DataError(f"input_ids hold {count} image tokens but no pixel_values were given")
            return embeds
        features = self.image_features(pixel_values)
        views, per_view = features.shape[:2]
        if views * per_view != count:
            raise DataError(
                f"input_ids hold {count} image tokens but pixel_values give {views} view(s) x {per_view} features "
                f"= {views * per_view}; encode prompts and images together with vlm.processor"
            )
        return embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> VLMOutput:
        """``attention_mask``: 2-D padding mask or the decoder's 4-D boolean allowed-keys mask (packed
        sequences); ``labels``: token ids, -100 where no loss is wanted (shifted here: position ``t`` predicts
        ``labels[t + 1]``)."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        hidden = self.decoder.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        loss, num_labels = None, 0
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise DataError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
            target = labels[:, 1:].to(hidden.device)
            keep = target != IGNORE_INDEX
            num_labels = int(keep.sum())
            logits = self.decoder.logits(hidden[:, :-1][keep])
            loss = F.cross_entropy(logits.float(), target[keep])
        return VLMOutput(loss=loss, num_labels=num_labels, hidden=hidden, head=self.decoder.logits)

    # ------------------------------------------------------------------------------------- generation

    def _steps(self, prompt: Any, images: Any, options: dict[str, Any]) -> tuple[Iterator[Tensor], int]:
        batch = self.processor(prompt, images)
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        with torch.inference_mode():
            embeds = self.embed_inputs(input_ids, batch["pixel_values"])
        steps = self.decoder.generate_stream(
            input_ids, inputs_embeds=embeds, attention_mask=attention_mask, eos_token_id=None, **options
        )
        return steps, input_ids.shape[0]

    def stream(
        self,
        prompt: Any,
        images: Any = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Iterator[Any]:
        """Yield the answer as text pieces while it is generated (a list of pieces per step for a list of
        prompts). Pieces never split a multi-byte character; joined they equal `generate`'s answer."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        single = is_single_prompt(prompt)
        steps, rows = self._steps(prompt, images, options)
        stops = set(self.decoder.config.eos_token_ids)
        ids: list[list[int]] = [[] for _ in range(rows)]
        ended = [False] * rows
        shown = [""] * rows
        for tokens in steps:
            for r, token in enumerate(tokens.tolist()):
                if not ended[r]:
                    if token in stops:
                        ended[r] = True
                    else:
                        ids[r].append(token)
            pieces = [self._new_text(ids[r], shown, r, final=False) for r in range(rows)]
            if any(pieces):
                yield pieces[0] if single else pieces
        pieces = [self._new_text(ids[r], shown, r, final=True) for r in range(rows)]
        if any(pieces):
            yield pieces[0] if single else pieces

    def _new_text(self, ids: list[int], shown: list[str], row: int, *, final: bool) -> str:
        """The text of ``ids`` not yet shown; held back while it ends inside a multi-byte character."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(shown[row]):
            return ""
        piece, shown[row] = text[len(shown[row]) :], text
        return piece

    def generate(
        self,
        prompt: Any,
        images: Any = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> str | list[str]:
        """The answer to a prompt (a string or chat messages; ``<image>`` marks where each image goes,
        otherwise images precede the text), or a list of answers to a list of prompts (``images``: one list
        per prompt). Greedy when ``temperature == 0``; stops at the decoder's end-of-sequence tokens."""
        single = is_single_prompt(prompt)
        answers: list[str] | None = None
        for pieces in self.stream(
            prompt, images, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
        ):
            pieces = [pieces] if single else pieces
            answers = [a + p for a, p in zip(answers, pieces)] if answers else list(pieces)
        if answers is None:
            rows = 1 if single else len(prompt)
            answers = [""] * rows
        return answers[0] if single else answers

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``folder``: written to a
        temporary folder next to it, then renamed into place (an existing model folder is replaced only once
        the new one is complete)."""
        from safetensors.torch import save_file

        if self.tokenizer is None:
            raise ConfigError("this VLM has no tokenizer to save; build it with build_vlm or load_vlm")
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not _is_model_folder(folder):
            raise ConfigError(f"{folder} exists and is not a tinyvlm model folder; refusing to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.saving-"))
        try:
            (staging / "config.json").write_text(self.config.to_json() + "\n")
            save_file(_unique_tensors(self), str(staging / "model.safetensors"), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(staging)
            _swap_into_place(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def push_to_hub(
        self, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str = "Upload tinyvlm model"
    ) -> str:
        """Upload the saved model and a model card (README.md naming the components) to ``repo_id``;
        returns the commit URL."""
        from huggingface_hub import HfApi, errors

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            (folder / "README.md").write_text(model_card(self.config, repo_id))
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
            except errors.HfHubHTTPError as error:
                raise HubError(
                    f"pushing to {repo_id} failed: {error}. Check the repo name and that HF_TOKEN (or `hf auth "
                    "login`) gives write access."
                ) from None
        return str(getattr(commit, "commit_url", commit))


# --------------------------------------------------------------------------------------------- building


def build_vlm(
    encoder: str | VLMConfig,
    decoder: str | None = None,
    projector: str | None = None,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
    projector_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
) -> VLM:
    """Join an encoder and a decoder through a projector (default ``pixel-shuffle-mlp``), or build a recipe
    (one name, or a `VLMConfig`). Names are zoo keys, ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:PATH``.

    ``pretrained`` loads the backbones' weights (entries without weights are random-init); the projector is
    always freshly initialised. ``dtype=None`` keeps the checkpoints' dtypes (decoders bf16, encoders fp32)
    and makes the projector fp32. ``*_kwargs`` override config fields of each part; ``processor_kwargs``
    those of `ImageTokenConfig` (``split_images=True, max_grid=4``, ...).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point dtype (torch.float32 / bfloat16), got {dtype}")
    config = _vlm_config(encoder, decoder, projector, encoder_kwargs, decoder_kwargs, projector_kwargs, processor_kwargs)
    from tinyvlm.factory import build_module
    from tinyvlm.hub import model_folder, parse_name
    from tinyvlm.tokenizer import load_tokenizer

    def revision(name: str, kind: Any) -> str | None:
        source = parse_name(name, kind)
        if not pretrained or source.repo_id is None:
            return None
        return model_folder(source, weights=False).name  # the snapshot folder is named after the commit

    options = dict(pretrained=pretrained, dtype=dtype, device=device)
    enc = build_module("encoder", config.encoder, overrides=config.encoder_kwargs, **options)  # type: ignore[arg-type]
    dec = build_module("decoder", config.decoder, overrides=config.decoder_kwargs, **options)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(config.decoder)
    with torch.device(device or "cpu"):
        proj = _projector(config, _projector_base(config), enc, dec)
    proj = proj.to(dtype or torch.float32)

    tokens = config.image_tokens
    markers = tokens.marker_tokens()
    ids = tokenizer.add_special_tokens([*markers, tokens.image_token])
    marker_ids, image_token_id = ids[:-1], ids[-1]
    if marker_ids and max(marker_ids) >= dec.vocab_size:
        dec.resize_vocab(max(marker_ids) + 1)  # rows for the markers only; the image token needs none
    parts = BuiltParts(
        encoder=_record(enc, revision(config.encoder, "encoder")),
        decoder=_record(dec, revision(config.decoder, "decoder")),
        projector=_record(proj, None),
        image_token_id=image_token_id,
        marker_token_ids=marker_ids,
    )
    return VLM(config.replace(parts=parts), enc, proj, dec, tokenizer).eval()


def _vlm_config(
    encoder: str | VLMConfig,
    decoder: str | None,
    projector: str | None,
    encoder_kwargs: dict[str, Any] | None,
    decoder_kwargs: dict[str, Any] | None,
    projector_kwargs: dict[str, Any] | None,
    processor_kwargs: dict[str, Any] | None,
) -> VLMConfig:
    """The config to build: from an encoder + decoder pair, or a recipe with the options merged in (a trained
    zoo VLM is an error: it is loaded with `load_vlm`)."""
    if decoder is not None:
        if not isinstance(encoder, str):
            raise ConfigError("build_vlm(encoder, decoder): pass names; pass a VLMConfig alone")
        return VLMConfig(
            encoder=encoder,
            decoder=decoder,
            projector=projector or "pixel-shuffle-mlp",
            encoder_kwargs=encoder_kwargs or {},
            decoder_kwargs=decoder_kwargs or {},
            projector_kwargs=projector_kwargs or {},
            image_tokens=ImageTokenConfig.validate_dict(processor_kwargs or {}, context="processor_kwargs"),
        )
    if isinstance(encoder, VLMConfig):
        recipe = encoder
    else:
        from tinyvlm.registry import get_spec

        spec = get_spec(encoder, kind="vlm")
        if spec.trained:
            raise ConfigError(
                f"{encoder!r} is a trained VLM: load it with tinyvlm.load_vlm({encoder!r}) "
                "(build_vlm assembles recipes and encoder + decoder pairs)"
            )
        recipe = spec.config  # type: ignore[assignment]
    return recipe.replace(
        projector=projector or recipe.projector,
        encoder_kwargs={**recipe.encoder_kwargs, **(encoder_kwargs or {})},
        decoder_kwargs={**recipe.decoder_kwargs, **(decoder_kwargs or {})},
        projector_kwargs={**recipe.projector_kwargs, **(projector_kwargs or {})},
        image_tokens=recipe.image_tokens.replace(**(processor_kwargs or {})),
        parts=None,  # the record of an earlier build: resolved again from the names
    )


def _projector_base(config: VLMConfig) -> PixelShuffleConfig:
    """The projector entry's config with ``projector_kwargs`` applied (zoo lookup only: no measuring)."""
    base = get_config(config.projector, kind="projector")
    if not isinstance(base, PixelShuffleConfig):
        raise ConfigError(f"projector family {base.family!r} is not supported by the VLM")
    return base.replace(**config.projector_kwargs) if config.projector_kwargs else base


def _projector(config: VLMConfig, base: PixelShuffleConfig, encoder: nn.Module, decoder: nn.Module) -> nn.Module:
    """Build the projector from ``base`` for this encoder and decoder: widths checked (or filled in),
    the pixel-shuffle factor checked against the encoder's grid (or chosen from it)."""
    problems = []
    if base.in_dim is not None and base.in_dim != encoder.dim:
        problems.append(f"its in_dim is {base.in_dim} but the encoder {config.encoder!r} gives tokens of width {encoder.dim}")
    if base.out_dim is not None and base.out_dim != decoder.dim:
        problems.append(f"its out_dim is {base.out_dim} but the decoder {config.decoder!r} has width {decoder.dim}")
    if problems:
        raise ConfigError(f"projector {config.projector!r} does not fit: {'; '.join(problems)}")
    size = encoder.image_size
    grid = encoder.grid_size(size, size)
    factor = default_factor(grid) if base.factor is None else base.factor
    check_factor(factor, grid, what=f"the {size}x{size} grid of {config.encoder!r}")
    resolved = base.replace(in_dim=encoder.dim, out_dim=decoder.dim, factor=factor)
    return get_family(resolved.family).build(resolved)


def _zoo_part(name: str, kind: Any, overrides: dict[str, Any]) -> nn.Module:
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"{name!r} cannot be resolved offline; build the VLM with tinyvlm.build_vlm")
    config = get_config(name, kind=kind)
    return get_family(config.family).build(config.replace(**overrides) if overrides else config)


def _build_part(record: PartRecord) -> nn.Module:
    family = get_family(record.family_name)
    return family.build(family.config_cls.validate_dict(record.config, context=family.name))


def _record(module: nn.Module, revision: str | None) -> PartRecord:
    config = module.config
    return PartRecord(family_name=config.family, revision=revision, config=config.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------- loading


def load_vlm(name: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> VLM:
    """A VLM saved by `VLM.save_pretrained`: a folder (a path or ``local-dir:PATH``), a Hub repo of one
    (``hf-hub:ORG/NAME[@REV]``) or a trained zoo VLM. Built on the meta device and loaded strictly."""
    from tinyvlm.hub import read_config
    from tinyvlm.tokenizer import Tokenizer
    from tinyvlm.weights import KeyMap, load_checkpoint, safetensors_files

    from tinyvlm.pretrained import load_foreign

    foreign = load_foreign(str(name), dtype=dtype, device=device)  # SmolVLM / nanoVLM checkpoints
    if foreign is not None:
        return foreign
    folder = _model_folder(str(name))
    config = VLMConfig.from_hf(read_config(folder))
    if config.parts is None:
        raise ConfigError(f"{folder}/config.json is a recipe, not a saved model; build it with tinyvlm.build_vlm")
    with torch.device("meta"):
        vlm = VLM.from_config(config)
    load_checkpoint(vlm, safetensors_files(folder), KeyMap(rename=((r"(.+)", r"\1"),)), dtype=dtype, device=device)
    tokenizer = Tokenizer.from_folder(folder)
    tokens = config.image_tokens
    found = [tokenizer.token_to_id(t) for t in [*tokens.marker_tokens(), tokens.image_token]]
    expected = [*config.parts.marker_token_ids, config.parts.image_token_id]
    if found != expected:
        raise ConfigError(f"{folder}: the tokenizer's image-token ids {found} differ from config.json's {expected}")
    vlm.tokenizer = tokenizer
    return vlm.eval()


def _model_folder(name: str) -> Path:
    from tinyvlm.hub import HF_HUB, LOCAL_DIR, model_folder, parse_name
    from tinyvlm.registry import get_spec

    if name.startswith((HF_HUB, LOCAL_DIR)):
        return model_folder(parse_name(name, "vlm"), weights=True, tokenizer=True)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HubError(f"{path} is not a saved VLM folder (no config.json)")
        return path
    spec = get_spec(name, kind="vlm")
    if not spec.trained:
        raise ConfigError(f"{name!r} is a recipe (untrained): build it with tinyvlm.build_vlm({name!r})")
    return model_folder(parse_name(name, "vlm"), weights=True, tokenizer=True)


def _is_model_folder(folder: Path) -> bool:
    try:
        import json

        return json.loads((folder / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def _unique_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor (a tied LM head) stored once, under its first name."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _swap_into_place(staging: Path, folder: Path) -> None:
    if not folder.exists():
        staging.rename(folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    old.rmdir()
    folder.rename(old)
    try:
        staging.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_card(config: VLMConfig, repo_id: str) -> str:
    """A Hub model card (README.md) naming the components."""
    parts = config.parts
    projector = parts.projector.config if parts else config.projector_kwargs
    bases = [_hub_repo(config.encoder), _hub_repo(config.decoder)]
    front = ["---", "library_name: tinyvlm", "pipeline_tag: image-text-to-text", "tags:", "- tinyvlm", "- vision-language"]
    if any(bases):
        front += ["base_model:"] + [f"- {b}" for b in bases if b]
    front.append("---")
    rows = [
        f"| encoder | `{config.encoder}` | {_revision_of(parts.encoder if parts else None)} |",
        f"| projector | `{config.projector}` (factor {projector.get('factor')}, head {projector.get('head', '')}) | new |",
        f"| decoder | `{config.decoder}` | {_revision_of(parts.decoder if parts else None)} |",
    ]
    split = "on" if config.image_tokens.split_images else "off"
    return "\n".join(
        [
            *front,
            "",
            f"# {repo_id.split('/')[-1]}",
            "",
            "A vision-language model assembled with [tinyvlm](https://pypi.org/project/tinyvlm/).",
            "",
            "| part | name | revision |",
            "|---|---|---|",
            *rows,
            "",
            f"Image tokens: `{config.image_tokens.image_token}`, image splitting {split}.",
            "",
            "```python",
            "import tinyvlm",
            "",
            f'vlm = tinyvlm.load_vlm("hf-hub:{repo_id}")',
            'print(vlm.generate("Describe the image.", images=["photo.jpg"]))',
            "```",
            "",
        ]
    )


def _hub_repo(name: str) -> str | None:
    from tinyvlm.hub import HF_HUB, LOCAL_DIR
    from tinyvlm.registry import get_spec

    if name.startswith(HF_HUB):
        return name[len(HF_HUB) :].partition("@")[0]
    if name.startswith(LOCAL_DIR):
        return None
    try:
        return get_spec(name).hub_repo
    except TinyVLMError:
        return None


def _revision_of(record: PartRecord | None) -> str:
    return record.revision if record and record.revision else "-"


register_family(Family(name="vlm", kind="vlm", config_cls=VLMConfig, build=VLM.from_config, hf_model_types=(MODEL_TYPE,)))

# ------------------------------------------------------------------------------------------------- zoo

register_model(
    "nanovlm-222m",
    family="vlm",
    config=VLMConfig(
        encoder="siglip-b16-224", decoder="smollm2-135m", projector="pixel-shuffle-linear", projector_kwargs={"factor": 2}
    ),
    license="apache-2.0",
    description="nanoVLM-222M recipe: SigLIP-B/16-224 + SmolLM2-135M, pixel shuffle 2 + Linear (49 tokens)",
)
register_model(
    "nanovlm-460m",
    family="vlm",
    config=VLMConfig(
        encoder="siglip2-b16-512",
        decoder="smollm2-360m-instruct",
        projector="pixel-shuffle-linear",
        projector_kwargs={"factor": 4},
        image_tokens=ImageTokenConfig(split_images=True, max_grid=4),
    ),
    license="apache-2.0",
    description="nanoVLM-460M recipe: SigLIP2-B/16-512 + SmolLM2-360M-Instruct, shuffle 4 + Linear, 4x4 tiles",
)
register_model(
    "dinov3-gemma3-270m",
    family="vlm",
    config=VLMConfig(
        encoder="dinov3-vits16plus", decoder="gemma-3-270m-it", projector="pixel-shuffle-linear", projector_kwargs={"factor": 2}
    ),
    license="dinov3-license + gemma",
    description="DINOv3 ViT-S/16+ + Gemma-3-270M-it, pixel shuffle 2 + Linear (the nanoVLM fork's preset; both parts gated)",
)
register_model(
    "test-vlm",
    family="vlm",
    config=VLMConfig(encoder="test-siglip", decoder="test-llama", projector_kwargs={"factor": 2}),
    license="apache-2.0",
    description="tiny random-init VLM (test-siglip + test-llama, shuffle 2 + MLP) for tests and demos",
)
