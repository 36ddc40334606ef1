"""Every option of `tinyvlm.train` / ``tinyvlm train``, validated before anything is built. Torch-free.

The field descriptions are the command line's help texts and the field names its flags (``max_steps`` is
``--max-steps``): `tinyvlm.cli` builds the ``train`` parser from this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tinyvlm.config import RuntimeOptions
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.interop.lora_settings import DEFAULT_PARTS, DEFAULT_TARGETS, PARTS as LORA_PARTS, TARGETS, LoraSettings, parse_names

PARTS = ("encoder", "projector", "decoder")
#: Fields that may change when resuming without changing the trajectory.
RESUMABLE_CHANGES = {"resume", "workers", "prefetch_factor", "progress", "device", "log_every",
                     "activation_checkpointing", "report_to", "project", "threads"}
#: ``report_to`` names: the experiment trackers a run can log to (`tinyvlm.training.tracking`).
TRACKERS = ("tensorboard", "wandb", "trackio")


class TrainConfig(RuntimeOptions):
    """The options of a training run. None means "the model's training default" (`TrainingDefaults`:
    nanoVLM's unless a recipe says otherwise) where a description says so."""

    data: list[str] = Field(description="training data: a JSONL or JSON file (image paths relative to it), a parquet "
                            "file or folder, a save_to_disk folder, or hf-dataset:ORG/NAME[/CONFIG][@REVISION] "
                            "(streamed); repeat to mix several sources")
    data_weights: list[float] | None = Field(None, description="sampling weight of each data source, in the order "
                                             "of --data (once per source; default: equal)")
    data_split: str = Field("train", description="split of the data sources (a single file is split train)")
    output: Path = Field(description="folder for metrics.jsonl, checkpoints/ and the final model/")
    model: str | None = Field(None, description="a VLM instead of the parts: a recipe (e.g. test-vlm), a saved "
                              "VLM folder or a trained VLM")
    encoder: str | None = Field(None, description="vision encoder name (with --decoder)")
    decoder: str | None = Field(None, description="language decoder name (with --encoder)")
    projector: str | None = Field(None, description="projector name, with encoder + decoder (default pixel-shuffle-mlp)")
    pretrained: bool = Field(True, description="load the parts' pretrained weights (recipes and pairs only)")
    train: str = Field("projector", description="parts to train in full: projector, all, a list like "
                       "projector,decoder, or none (with lora)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (default: one pass over the data)")
    batch_size: int | None = Field(None, ge=1, description="samples per micro-batch and process (default: the "
                                   "model's, nanoVLM's 2)")
    grad_accum: int | None = Field(None, ge=1, description="micro-batches per optimizer step (default: the model's, "
                                   "nanoVLM's 8)")
    lr: float | None = Field(None, gt=0, description="learning rate of every trained part (default: the model's, "
                             "nanoVLM's 5.12e-3 projector, 5e-5 encoder and decoder)")
    lr_encoder: float | None = Field(None, gt=0, description="encoder learning rate (overrides lr)")
    lr_projector: float | None = Field(None, gt=0, description="projector learning rate (overrides lr)")
    lr_decoder: float | None = Field(None, gt=0, description="decoder learning rate (overrides lr)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of matrices (not of norms and biases)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps, then cosine (default: 5% of the steps)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    grad_clip: float | None = Field(None, ge=0, description="clip the gradient norm, 0 for no clipping (default: "
                                    "the model's, 1.0)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: every process holds the whole model "
                                             "(DistributedDataParallel under torchrun); fsdp: parameters, gradients "
                                             "and optimizer state sharded over the processes (FSDP2, per block)")
    activation_checkpointing: bool = Field(False, description="recompute each encoder and decoder block's "
                                           "activations in the backward pass instead of keeping them (less memory, "
                                           "about a third more compute; same losses)")
    pack: bool = Field(False, description="pack several samples per row of max_length tokens")
    max_length: int | None = Field(None, ge=1, description="longest sample / packed row in tokens (default: the "
                                   "model's, 4096, or the decoder's context if shorter)")
    val_data: str | None = Field(None, description="held-out data, in any form data takes (default: hold out "
                                 "val_fraction of data)")
    val_split: str | None = Field(None, description="split of val_data (default: data_split)")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="fraction of data held out when val_data is not given")
    val_rows: int = Field(512, ge=1, description="held-out samples evaluated, at most (the first ones)")
    shuffle_block: int = Field(1000, ge=1, description="rows of a dataset source shuffled together: its stored order "
                               "is cut into blocks of this many rows, each permuted (1 keeps the stored order)")
    relevance_min_rating: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this for "
                                      "relevance (1 keeps every turn)")
    image_correspondence_min_rating: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below "
                                                 "this for image correspondence")
    visual_dependency_min_rating: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this "
                                              "for visual dependency")
    formatting_min_rating: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this for "
                                       "formatting")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: after the last step only)")
    eval_samples: int = Field(256, ge=0, description="held-out records answered for exact-match accuracy")
    max_new_tokens: int = Field(32, ge=1, description="answer length limit when evaluating")
    checkpoint_every: int = Field(500, ge=0, description="checkpoint every N steps, 0 for never")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept")
    log_every: int = Field(10, ge=1, description="log metrics every N steps")
    lora: int | None = Field(None, ge=1, description="LoRA rank: train low-rank adapters (peft) of lora_parts "
                             "instead of their weights; the run saves the adapter alone (needs tinyvlm[lora])")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha: the adapter is scaled by alpha / rank "
                                   "(default: the rank, scale 1)")
    lora_targets: str = Field(DEFAULT_TARGETS, description="layers LoRA adapts, a comma list of "
                              f"{','.join(TARGETS)} (encoders: up = fc1, down = fc2)")
    lora_parts: str = Field(DEFAULT_PARTS, description="parts LoRA adapts: decoder, encoder or decoder,encoder")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_rslora: bool = Field(False, description="scale LoRA by alpha / sqrt(rank) (rank-stabilised LoRA)")
    seed: int = Field(0, description="seed of initialisation, data order and split")
    resume: bool = Field(False, description="continue the run in output from its last checkpoint")
    device: str | None = Field(None, description="cpu, cuda, cuda:1... (default: cuda if available; under torchrun "
                               "cuda:LOCAL_RANK)")
    workers: int = Field(0, ge=0, description="data-loading worker processes (decode and preprocess images)")
    prefetch_factor: int = Field(2, ge=1, description="micro-batches each worker prepares ahead")
    progress: bool = Field(True, description="show a progress bar")
    report_to: list[str] = Field([], description=f"also log the metrics to {', '.join(TRACKERS)} (repeat the "
                                 "flag or give a comma list; each needs its extra, e.g. tinyvlm[wandb])")
    project: str = Field("tinyvlm", min_length=1, description="wandb / trackio project of the run (the run is "
                         "named after the output folder)")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more_sources(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            return [str(value)]
        if isinstance(value, (list, tuple)):
            return [str(v) if isinstance(v, Path) else v for v in value]
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _comma_lists(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            names = [name.strip() for item in value for name in str(item).split(",") if name.strip()]
            unknown = [name for name in names if name not in TRACKERS]
            if unknown:
                raise ValueError(f"unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
            return list(dict.fromkeys(names))
        return value

    @field_validator("val_data", mode="before")
    @classmethod
    def _path_to_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("data", "val_data")
    @classmethod
    def _parseable(cls, value: Any) -> Any:
        from tinyvlm.data.readers import parse_source

        for text in [value] if isinstance(value, str) else value or []:
            try:
                parse_source(text)
            except DataError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.data:
            raise ValueError("give at least one data source")
        if self.data_weights is not None:
            if len(self.data_weights) != len(self.data):
                raise ValueError(f"{len(self.data_weights)} data weight(s) for {len(self.data)} data source(s): give "
                                 "one weight per source, in the same order")
            if any(w <= 0 for w in self.data_weights):
                raise ValueError(f"data weights must be positive, got {self.data_weights}")
        if self.val_split is not None and self.val_data is None:
            raise ValueError("val_split is the split of val_data: give val_data too")
        if self.model is not None and (self.encoder is not None or self.decoder is not None):
            raise ValueError("give either model (a VLM recipe or folder) or encoder + decoder, not both")
        if self.model is None and (self.encoder is None or self.decoder is None):
            raise ValueError("give model (a VLM recipe or folder), or both encoder and decoder")
        if self.model is not None and self.projector is not None:
            raise ValueError("projector goes with encoder + decoder; a model (recipe or folder) has its own")
        if self.val_data is not None and "val_fraction" in self.model_fields_set:
            raise ValueError("give val_data or val_fraction, not both")
        parse_parts(self.train)
        lora_options = sorted(f for f in self.model_fields_set if f.startswith("lora_"))
        if self.lora is None:
            if lora_options:
                raise ValueError(f"{', '.join(lora_options)} need lora (the LoRA rank)")
            if not self.parts:
                raise ValueError("train='none' leaves nothing to train (it goes with lora)")
        else:
            lora = self.lora_settings
            overlap = [part for part in lora.parts if part in self.parts]  # type: ignore[union-attr]
            if overlap:
                raise ValueError(f"{', '.join(overlap)} is both in train (trained in full) and in lora_parts "
                                 "(adapted with LoRA): choose one")
            if self.strategy == "fsdp":
                raise ValueError("lora trains a small adapter on a frozen base: use strategy ddp (the default; the "
                                 "frozen base is replicated), fsdp does not shard LoRA runs")
            if self.model is None:
                raise ValueError("lora needs model (a VLM recipe or a saved / trained VLM), the base the adapter "
                                 "applies to; encoder + decoder pairs have no single name to record")
        return self

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts trained in full."""
        return parse_parts(self.train)

    @property
    def lora_settings(self) -> LoraSettings | None:
        if self.lora is None:
            return None
        return LoraSettings(
            rank=self.lora, alpha=self.lora_alpha, dropout=self.lora_dropout, rslora=self.lora_rslora,
            targets=parse_names(self.lora_targets, TARGETS, what="lora_targets"),
            parts=parse_names(self.lora_parts, LORA_PARTS, what="lora_parts"),
        )

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """Every part with trained weights: in full or through LoRA, in model order."""
        lora = self.lora_settings.parts if self.lora is not None else ()  # type: ignore[union-attr]
        return tuple(part for part in PARTS if part in self.parts or part in lora)

    @property
    def ratings(self) -> dict[str, int]:
        """The FineVision rating minimums, by rating kind."""
        return {kind: getattr(self, f"{kind}_min_rating")
                for kind in ("relevance", "image_correspondence", "visual_dependency", "formatting")}

    def resolved(self, defaults: Any, context_length: int) -> "Settings":
        """The options left at None filled in from the model's training defaults (`TrainingDefaults`)."""
        lrs = {}
        for part in self.trained_parts:
            own = getattr(self, f"lr_{part}")
            lrs[part] = own if own is not None else self.lr if self.lr is not None else getattr(defaults, f"lr_{part}")
            if lrs[part] == 0:
                raise ConfigError(
                    f"the model's default learning rate for the {part} is 0 (frozen): give lr_{part} "
                    f"(--lr-{part}) or leave the {part} out of train"
                )
        return Settings(
            batch_size=self.batch_size or defaults.batch_size,
            grad_accum=self.grad_accum or defaults.gradient_accumulation_steps,
            grad_clip=defaults.max_grad_norm if self.grad_clip is None else self.grad_clip,
            max_length=self.max_length or min(defaults.max_length, context_length),
            lrs=lrs,
        )


@dataclass(frozen=True)
class Settings:
    """The options that default to the model's training defaults, resolved."""

    batch_size: int
    grad_accum: int
    grad_clip: float
    max_length: int
    lrs: dict[str, float]


def parse_parts(spec: str) -> tuple[str, ...]:
    """``'all'`` / ``'projector'`` / ``'projector,decoder'`` / ``'none'`` -> the trained parts, in model order."""
    names = {name.strip() for name in spec.split(",") if name.strip()}
    if names == {"all"}:
        return PARTS
    if names == {"none"}:
        return ()
    unknown = names - set(PARTS)
    if unknown or not names:
        raise ValueError(f"train={spec!r}: expected 'all', 'none' or a comma list of {', '.join(PARTS)}")
    return tuple(part for part in PARTS if part in names)


def make_config(**options: Any) -> TrainConfig:
    """Validate ``options`` into a `TrainConfig`, with one readable `ConfigError` naming each bad option."""
    try:
        return TrainConfig(**options)
    except ConfigError as error:
        raise ConfigError(f"invalid training options: {error}") from None
