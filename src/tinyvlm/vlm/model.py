"""The VLM module: ``encoder`` -> ``projector`` -> ``decoder``, with its tokenizer and processor.

Forward (LLaVA / nanoVLM style): ``embeds = decoder.embed(input_ids)`` (the family's own scaling, e.g.
Gemma's sqrt(hidden), applies to text only); the positions holding the image token are replaced by the
projected image features, in order; the decoder runs on those embeddings. The image token's own embedding
row is never looked up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyvlm.errors import ConfigError, DataError
from tinyvlm.generation import SamplingConfig, TextStream, generate_tokens, stop_ids
from tinyvlm.processing.processor import IGNORE_INDEX, Processor, is_single_prompt
from tinyvlm.processing.tokens import default_token_layout
from tinyvlm.projectors.pixel_shuffle import PixelShuffleConfig, check_factor, default_factor
from tinyvlm.registry import get_config, get_family, get_writer
from tinyvlm.vlm import files
from tinyvlm.vlm.config import BuiltParts, PartRecord, VLMConfig


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

    #: `tinyvlm.load_vlm` under the name transformers users reach for: the same function, bound by
    #: `tinyvlm.api` (which imports this module, so this module cannot import it).
    from_pretrained: ClassVar[Callable[..., "VLM"]]

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

    def stream(
        self,
        prompt: Any,
        images: Any = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        raw: bool = False,
    ) -> Iterator[Any]:
        """Yield the answer as text pieces while it is generated (for a list of prompts, a list with one
        piece per prompt, "" for those with nothing new). Same arguments as `generate`; joined, the pieces
        are `generate`'s answer. Bad arguments raise here, before the first piece."""
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop=stop, seed=seed,
        )  # fmt: skip
        return self._stream(prompt, images, sampling, raw=raw)

    def generate(
        self,
        prompt: Any,
        images: Any = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        raw: bool = False,
    ) -> str | list[str]:
        """The answer to a prompt, or a list of answers to a list of prompts (``images``: one list per prompt).

        ``prompt``: a string (one user turn, formatted exactly as training formats conversations: the chat
        template, or the plain ``User: ...`` transcript of a base decoder) or chat messages; ``<image>``
        marks where each image goes, otherwise the images precede the text. ``raw=True`` takes a string as
        plain text to continue (no template, no roles; BOS as the tokenizer adds it). The sampling options
        are `tinyvlm.generation.SamplingConfig`'s; the answer ends at the decoder's end-of-sequence tokens
        or before the first ``stop`` string."""
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop=stop, seed=seed,
        )  # fmt: skip
        single = is_single_prompt(prompt)
        answers: list[str] | None = None
        for pieces in self._stream(prompt, images, sampling, raw=raw):
            pieces = [pieces] if single else pieces
            answers = list(pieces) if answers is None else [a + p for a, p in zip(answers, pieces)]
        if answers is None:
            answers = [""] * (1 if single else len(prompt))
        return answers[0] if single else answers

    def _stream(self, prompt: Any, images: Any, sampling: SamplingConfig, *, raw: bool) -> Iterator[Any]:
        """Encode the prompts and start the token loop now (so bad input raises at once); the returned
        iterator turns each step's tokens into text pieces."""
        single = is_single_prompt(prompt)
        batch = self.processor(prompt, images, raw=raw)
        input_ids = batch["input_ids"].to(self.device)
        with torch.inference_mode():
            embeds = self.embed_inputs(input_ids, batch["pixel_values"])
        steps = generate_tokens(
            self.decoder, input_ids, sampling, attention_mask=batch["attention_mask"].to(self.device), inputs_embeds=embeds
        )
        texts = [TextStream(self.tokenizer, sampling.stop) for _ in range(input_ids.shape[0])]
        return _text_pieces(steps, texts, set(stop_ids(self.decoder, sampling)), single=single)

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, folder: str | Path, layout: str = "tinyvlm", *, overwrite: bool = False) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``folder``, atomically
        (a temporary folder next to it, renamed into place once complete). Another file ``layout`` is written
        by its registered writer (`tinyvlm.registry.get_writer`): ``"transformers"``, transformers' Idefics3
        layout (`tinyvlm.interop.transformers.save_idefics3`: SigLIP + Llama + pixel-shuffle-linear VLMs with
        the smolvlm token layout). ``folder`` must be new or empty; with ``overwrite`` a saved model there is
        replaced (`tinyvlm.vlm.files.check_target`)."""
        if layout == "tinyvlm":
            return files.save_vlm(self, Path(folder), overwrite=overwrite)
        return get_writer(layout, "vlm")(self, Path(folder), overwrite=overwrite)

    def push_to_hub(
        self, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str = "Upload tinyvlm model"
    ) -> str:
        """Upload the saved model and a model card (README.md naming the components) to ``repo_id``;
        returns the commit URL."""
        return files.push_vlm(self, repo_id, private=private, token=token, commit_message=commit_message)


def _text_pieces(steps: Iterator[Tensor], texts: list[TextStream], stops: set[int], *, single: bool) -> Iterator[Any]:
    """Each step's tokens -> one new text piece per row (a row ends at a stop id or a stop string); stops
    the token loop as soon as every row has ended."""
    try:
        for tokens in steps:
            pieces = [
                "" if text.done else text.finish() if token in stops else text.push(token)
                for text, token in zip(texts, tokens.tolist())
            ]
            if all(text.done for text in texts):
                break
            if any(pieces):
                yield pieces[0] if single else pieces
        else:  # max_new_tokens reached: what the rows held back
            pieces = [text.finish() for text in texts]
        if any(pieces):
            yield pieces[0] if single else pieces
    finally:
        steps.close()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- parts


def projector_base(config: VLMConfig) -> PixelShuffleConfig:
    """The projector entry's config with ``projector_kwargs`` applied (zoo lookup only: no measuring)."""
    base = get_config(config.projector, kind="projector")
    if not isinstance(base, PixelShuffleConfig):
        raise ConfigError(f"projector family {base.family!r} is not supported by the VLM")
    return base.replace(**config.projector_kwargs) if config.projector_kwargs else base


def fit_projector(config: VLMConfig, base: PixelShuffleConfig, encoder: nn.Module, decoder: nn.Module) -> nn.Module:
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


def assemble(config: VLMConfig) -> VLM:
    """The VLM family's ``build`` (`tinyvlm.registry.Family`): the modules of ``config``, random init, on the
    current default device (``torch.device("meta")`` before loading weights). A recipe (no ``parts``) is
    resolved from the zoo, offline, without a tokenizer (so without vocabulary growth)."""
    if config.parts is not None:
        encoder = part_from_record(config.parts.encoder)
        decoder = part_from_record(config.parts.decoder)
        projector_config = PixelShuffleConfig.validate_dict(config.parts.projector.config, context="projector")
        projector = fit_projector(config, projector_config, encoder, decoder)
        return VLM(config, encoder, projector, decoder)
    encoder = _zoo_part(config.encoder, "encoder", config.encoder_kwargs)
    decoder = _zoo_part(config.decoder, "decoder", config.decoder_kwargs)
    tokens = config.image_tokens.resolved(default_token_layout(encoder.config.family, decoder.config.family))
    config = config.replace(image_tokens=tokens)
    projector = fit_projector(config, projector_base(config), encoder, decoder)
    parts = BuiltParts(
        encoder=record(encoder, None),
        decoder=record(decoder, None),
        projector=record(projector, None),
        image_token_id=-1,  # no tokenizer: ids unknown
    )
    return VLM(config.replace(parts=parts), encoder, projector, decoder)


def _zoo_part(name: str, kind: Any, overrides: dict[str, Any]) -> nn.Module:
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"{name!r} cannot be resolved offline; build the VLM with tinyvlm.build_vlm")
    config = get_config(name, kind=kind)
    return get_family(config.family).build(config.replace(**overrides) if overrides else config)


def part_from_record(record: PartRecord) -> nn.Module:
    """A part rebuilt from its record (random init, on the current default device)."""
    family = get_family(record.family_name)
    return family.build(family.config_cls.validate_dict(record.config, context=family.name))


def record(module: nn.Module, revision: str | None) -> PartRecord:
    config = module.config
    return PartRecord(family_name=config.family, revision=revision, config=config.model_dump(mode="json"))
