"""Every option of `tinyvlm.train` / ``tinyvlm train``, in sections, validated before anything is built. Torch-free.

A `TrainConfig` has seven sections, each a validated pydantic model (`tinyvlm.config.Options`: frozen, unknown
fields refused, a `ConfigError` naming each bad field):

=================  ==========================================================================================
section            what it holds
=================  ==========================================================================================
``model``          the VLM (``name``) or the encoder + decoder (+ projector) to join, and the parts trained
``data``           the training sources and their weights, the split, shuffling, lengths, packing, filters
``optimization``   steps, batch, accumulation, learning rates and their schedule, weight decay, clipping
``lora``           LoRA adapters (peft): None (the default) trains no adapter; a section trains one
``evaluation``     the held-out samples and how often they are evaluated
``checkpointing``  the output folder, checkpoints, resuming
``runtime``        devices, precision, strategy, data workers, threads, seed, logging and trackers
=================  ==========================================================================================

Every leaf field also has a *flat name*: the flag of ``tinyvlm train`` without its dashes, a key of a flat
``--config`` file and a keyword of ``tinyvlm.train(**fields)``. Flat names follow transformers'
``TrainingArguments`` where the meaning is the same (``learning_rate``, ``gradient_accumulation_steps``,
``max_grad_norm``, ``per_device_train_batch_size``, ``eval_steps``, ``save_steps``, ``output_dir``, ...), and
the names of earlier tinyvlm versions stay as aliases (``lr``, ``grad_accum``, ``grad_clip``, ``batch_size``,
``eval_every``, ``checkpoint_every``, ``output``, ...). `FLAT_FIELDS` lists them; `tinyvlm.cli` makes the
flags from it. LoRA is switched on by ``use_lora`` (a ``lora`` section); ``lora=RANK``, the older form, is
``use_lora`` and ``lora_rank=RANK`` in one.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from tinyvlm.config import Options, RuntimeOptions, describe_options
from tinyvlm.data.readers import parse_source
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.interop.lora_settings import DEFAULT_PARTS, PARTS as LORA_PARTS, TARGETS, LoraSettings, parse_names

PARTS = ("encoder", "projector", "decoder")
Part = Literal["encoder", "projector", "decoder"]
#: ``report_to`` names: the experiment trackers a run can log to (`tinyvlm.training.tracking`).
TRACKERS = ("tensorboard", "wandb", "trackio")
#: The share of every ``data`` source held out for evaluation when no ``val_data`` is given.
DEFAULT_VAL_FRACTION = 0.05


def names(flat: str, *aliases: str) -> dict[str, Any]:
    """The ``json_schema_extra`` of a field whose flat name is not its own name, or that has aliases."""
    return {"flat": flat, "aliases": list(aliases)}


def _comma_list(value: Any) -> Any:
    """``"a,b"`` / ``["a,b", "c"]`` -> ``["a", "b", "c"]`` (a flag given once with a comma list, or repeated)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [name.strip() for item in value for name in str(item).split(",") if name.strip()]
    return value


# ------------------------------------------------------------------------------------------------ sections


class ModelSection(Options):
    """What is trained: a VLM (``name``), or an encoder and a decoder joined by a new projector; and which of
    its parts learn in full."""

    name: str | None = Field(None, description="a VLM instead of the parts: a recipe (e.g. test-vlm), a saved VLM "
                             "folder or a trained VLM", json_schema_extra=names("model"))
    encoder: str | None = Field(None, description="vision encoder name (with --decoder)")
    decoder: str | None = Field(None, description="language decoder name (with --encoder)")
    projector: str | None = Field(None, description="projector name, with encoder + decoder (default "
                                  "pixel-shuffle-linear: a pixel shuffle and one Linear, as nanoVLM and SmolVLM)")
    image_token_layout: Literal["nanovlm", "smolvlm"] | None = Field(
        None, description="how images become tokens, with encoder + decoder: smolvlm (SmolVLM's, which transformers' "
        "Idefics3Processor writes) or nanovlm (default: smolvlm for a SigLIP encoder and a Llama-family decoder, "
        "whose models export to transformers; nanovlm otherwise)")
    pretrained: bool = Field(True, description="load the parts' pretrained weights (recipes and pairs only)")
    train: tuple[Part, ...] = Field(("projector",), description="parts trained in full: projector, all, a comma "
                                    "list like projector,decoder, or none (with LoRA)")

    @field_validator("train", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        listed = _comma_list(value)
        if not isinstance(listed, list):
            return value
        if listed == ["all"]:
            return PARTS
        if listed in (["none"], []):  # [] is how a config with no part trained in full saves itself
            return ()
        if not set(listed) <= set(PARTS):
            raise ValueError(f"expected 'all', 'none' or a comma list of {', '.join(PARTS)}")
        return tuple(part for part in PARTS if part in listed)

    @model_validator(mode="after")
    def _one_model(self) -> "ModelSection":
        if self.name is not None and (self.encoder is not None or self.decoder is not None):
            raise ValueError("give either model (a VLM recipe or folder) or encoder + decoder, not both")
        if self.name is None and (self.encoder is None or self.decoder is None):
            raise ValueError("give model (a VLM recipe or folder), or both encoder and decoder")
        if self.name is not None and self.projector is not None:
            raise ValueError("projector goes with encoder + decoder; a model (recipe or folder) has its own")
        if self.name is not None and self.image_token_layout is not None:
            raise ValueError("image_token_layout goes with encoder + decoder; a model (recipe or folder) has its own")
        return self


class MinRatings(Options):
    """FineVision's per-turn rating filters (nanoVLM's ``*_min_rating``): a turn rated below a minimum is dropped
    (1 keeps every turn)."""

    relevance: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this for relevance (1 "
                           "keeps every turn)", json_schema_extra=names("relevance_min_rating"))
    image_correspondence: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this for image "
                                      "correspondence", json_schema_extra=names("image_correspondence_min_rating"))
    visual_dependency: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this for visual "
                                   "dependency", json_schema_extra=names("visual_dependency_min_rating"))
    formatting: int = Field(1, ge=1, le=5, description="FineVision: drop turns rated below this for formatting",
                            json_schema_extra=names("formatting_min_rating"))


class DataSection(Options):
    """The training data: sources mixed by weights, their split, shuffling, sample lengths and filters."""

    sources: list[str] = Field(description="training data: a JSONL or JSON file (image paths relative to it), a "
                               "parquet file or folder, a save_to_disk folder, or hf-dataset:ORG/NAME[/CONFIG]"
                               "[@REVISION] (streamed); repeat to mix several sources", json_schema_extra=names("data"))
    weights: list[float] | None = Field(None, description="sampling weight of each data source, in the order of "
                                        "--data (once per source; default: equal)", json_schema_extra=names("data_weights"))
    split: str = Field("train", description="split of the data sources (a single file is split train)",
                       json_schema_extra=names("data_split"))
    shuffle_block: int = Field(1000, ge=1, description="rows of a dataset source shuffled together: its stored order "
                               "is cut into blocks of this many rows, each permuted (1 keeps the stored order)")
    max_length: int | None = Field(None, ge=1, description="longest sample / packed row in tokens (default: the "
                                   "model's, 4096, or the decoder's context if shorter)")
    pack: bool = Field(False, description="pack several samples per row of max_length tokens")
    min_ratings: MinRatings = MinRatings()

    @field_validator("sources", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            value = [value]
        return [str(v) if isinstance(v, Path) else v for v in value] if isinstance(value, (list, tuple)) else value

    @field_validator("sources")
    @classmethod
    def _parseable(cls, sources: list[str]) -> list[str]:
        if not sources:
            raise ValueError("give at least one data source")
        for text in sources:
            _check_source(text)
        return sources

    @model_validator(mode="after")
    def _weights(self) -> "DataSection":
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                raise ValueError(f"{len(self.weights)} data weight(s) for {len(self.sources)} data source(s): give "
                                 "one weight per source, in the same order")
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"data weights must be positive, got {self.weights}")
        return self


class PartLearningRates(Options):
    """Learning rates of single parts, over ``learning_rate`` (named as a VLM config's training defaults)."""

    encoder: float | None = Field(None, gt=0, description="encoder learning rate (overrides learning_rate)",
                                  json_schema_extra=names("lr_encoder"))
    projector: float | None = Field(None, gt=0, description="projector learning rate (overrides learning_rate)",
                                    json_schema_extra=names("lr_projector"))
    decoder: float | None = Field(None, gt=0, description="decoder learning rate (overrides learning_rate)",
                                  json_schema_extra=names("lr_decoder"))


class OptimizationSection(Options):
    """How many steps of which size, and AdamW's learning rates, schedule, weight decay and clipping. None means
    the model's training default (`TrainingDefaults`: nanoVLM's unless a recipe says otherwise)."""

    max_steps: int | None = Field(None, ge=1, description="optimizer steps (default: one pass over the data); a "
                                  "larger value on --resume extends a run")
    batch_size: int | None = Field(None, ge=1, description="samples per micro-batch and process (default: the "
                                   "model's, nanoVLM's 2)", json_schema_extra=names("per_device_train_batch_size",
                                                                                   "batch_size"))
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="micro-batches per optimizer step "
                                                    "(default: the model's, nanoVLM's 8)",
                                                    json_schema_extra=names("gradient_accumulation_steps", "grad_accum"))
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate of every trained part (default: "
                                       "the model's, nanoVLM's 5.12e-3 projector, 5e-5 encoder and decoder)",
                                       json_schema_extra=names("learning_rate", "lr"))
    part_learning_rates: PartLearningRates = PartLearningRates()
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of matrices (not of norms and biases)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps, then cosine (default: 5% of "
                                     "the steps)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    max_grad_norm: float | None = Field(None, ge=0, description="clip the gradient norm, 0 for no clipping (default: "
                                        "the model's, 1.0)", json_schema_extra=names("max_grad_norm", "grad_clip"))


class LoraSection(Options):
    """LoRA adapters (peft) on ``parts`` instead of training their weights; the run saves the adapter alone
    (needs tinyvlm[lora])."""

    rank: int = Field(8, ge=1, description="LoRA rank (with --use-lora)", json_schema_extra=names("lora_rank", "lora_r"))
    alpha: int | None = Field(None, ge=1, description="LoRA alpha: the adapter is scaled by alpha / rank (default: "
                              "the rank, scale 1)", json_schema_extra=names("lora_alpha"))
    targets: tuple[str, ...] = Field(tuple(TARGETS), description="layers LoRA adapts, a comma list of "
                                     f"{','.join(TARGETS)} (encoders: up = fc1, down = fc2)",
                                     json_schema_extra=names("lora_targets"))
    parts: tuple[str, ...] = Field((DEFAULT_PARTS,), description="parts LoRA adapts: decoder, encoder or "
                                   "decoder,encoder", json_schema_extra=names("lora_parts"))
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input", json_schema_extra=names("lora_dropout"))
    rslora: bool = Field(False, description="scale LoRA by alpha / sqrt(rank) (rank-stabilised LoRA)",
                         json_schema_extra=names("use_rslora", "lora_rslora"))

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        listed = _comma_list(value)
        return parse_names(",".join(listed), TARGETS, what="lora_targets") if isinstance(listed, list) else value

    @field_validator("parts", mode="before")
    @classmethod
    def _lora_parts(cls, value: Any) -> Any:
        listed = _comma_list(value)
        return parse_names(",".join(listed), LORA_PARTS, what="lora_parts") if isinstance(listed, list) else value

    @property
    def settings(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                            targets=self.targets, parts=self.parts)


class EvaluationSection(Options):
    """The held-out samples (a share of the training data, or ``val_data``) and when they are evaluated."""

    steps: int = Field(0, ge=0, description="evaluate every N steps (0: after the last step only)",
                       json_schema_extra=names("eval_steps", "eval_every"))
    samples: int = Field(256, ge=0, description="held-out records answered for exact-match accuracy",
                         json_schema_extra=names("eval_samples"))
    max_new_tokens: int = Field(32, ge=1, description="answer length limit when evaluating")
    data: str | None = Field(None, description="held-out data, in any form data takes (default: hold out "
                             "val_fraction of data)", json_schema_extra=names("val_data"))
    split: str | None = Field(None, description="split of val_data (default: data_split)",
                              json_schema_extra=names("val_split"))
    fraction: float | None = Field(None, ge=0, lt=1, description="share of every data source held out when val_data "
                                   f"is not given (default {DEFAULT_VAL_FRACTION}; 0: no held-out samples)",
                                   json_schema_extra=names("val_fraction"))
    rows: int = Field(512, ge=1, description="held-out samples evaluated, at most (the first ones)",
                      json_schema_extra=names("val_rows"))

    @field_validator("data", mode="before")
    @classmethod
    def _path_to_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("data")
    @classmethod
    def _parseable(cls, value: str | None) -> str | None:
        if value is not None:
            _check_source(value)
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> "EvaluationSection":
        if self.split is not None and self.data is None:
            raise ValueError("val_split is the split of val_data: give val_data too")
        if self.data is not None and self.fraction is not None:
            raise ValueError("give val_data or val_fraction, not both")
        if self.steps and self.fraction == 0:
            raise ValueError("eval_steps asks for evaluations, but val_fraction 0 holds nothing out: give val_data, "
                             "or a val_fraction above 0")
        return self

    @property
    def held_out_fraction(self) -> float:
        """The share of every training source held out (0 with ``val_data``)."""
        if self.data is not None:
            return 0.0
        return DEFAULT_VAL_FRACTION if self.fraction is None else self.fraction


class CheckpointingSection(Options):
    """Where the run writes, how often it checkpoints, and whether it continues an earlier run."""

    output_dir: Path = Field(description="folder for metrics.jsonl, checkpoints/ and the final model/",
                             json_schema_extra=names("output_dir", "output"))
    save_steps: int = Field(500, ge=0, description="checkpoint every N steps (and at the last), 0 for never",
                            json_schema_extra=names("save_steps", "checkpoint_every"))
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept",
                                  json_schema_extra=names("save_total_limit", "keep_checkpoints"))
    resume: bool = Field(False, description="continue the run in output_dir from its last checkpoint (with a larger "
                         "max_steps: extend it)")


class RuntimeSection(RuntimeOptions):
    """How the run uses the machine (`RuntimeOptions`: ``quantize``, ``threads``; devices, precision, strategy,
    data workers), its seed, and what it logs where."""

    device: str | None = Field(None, description="cpu, cuda, cuda:1... (default: cuda if available; under torchrun "
                               "cuda:LOCAL_RANK)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    torch_compile: bool = Field(False, description="torch.compile the model", json_schema_extra=names("torch_compile",
                                                                                                     "compile"))
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: every process holds the whole model "
                                             "(DistributedDataParallel under torchrun); fsdp: parameters, gradients "
                                             "and optimizer state sharded over the processes (FSDP2, per block)")
    gradient_checkpointing: bool = Field(False, description="recompute each encoder and decoder block's activations "
                                         "in the backward pass instead of keeping them (less memory, about a third "
                                         "more compute; same losses)",
                                         json_schema_extra=names("gradient_checkpointing", "activation_checkpointing"))
    dataloader_num_workers: int = Field(0, ge=0, description="data-loading worker processes (decode and preprocess "
                                        "images)", json_schema_extra=names("dataloader_num_workers", "workers"))
    dataloader_prefetch_factor: int = Field(2, ge=1, description="micro-batches each worker prepares ahead",
                                            json_schema_extra=names("dataloader_prefetch_factor", "prefetch_factor"))
    seed: int = Field(0, description="seed of initialisation, data order and split")
    logging_steps: int = Field(10, ge=1, description="log metrics every N steps",
                               json_schema_extra=names("logging_steps", "log_every"))
    progress: bool = Field(True, description="show a progress bar")
    report_to: list[str] = Field([], description=f"also log the metrics to {', '.join(TRACKERS)} (repeat the flag or "
                                 "give a comma list; each needs its extra, e.g. tinyvlm[wandb])")
    project: str = Field("tinyvlm", min_length=1, description="wandb / trackio project of the run (the run is named "
                         "after the output folder)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        listed = _comma_list(value)
        if isinstance(listed, list):
            unknown = [name for name in listed if name not in TRACKERS]
            if unknown:
                raise ValueError(f"unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
            return list(dict.fromkeys(listed))
        return value


def _check_source(text: str) -> None:
    try:
        parse_source(text)
    except DataError as error:
        raise ValueError(str(error)) from None


# ------------------------------------------------------------------------------------------------ the config


class TrainConfig(Options):
    """The options of a training run, in sections (see the module docstring). Build it from sections
    (``TrainConfig(model=..., data=..., checkpointing=...)``, dicts or section objects) or from flat names
    (`TrainConfig.from_fields`)."""

    model: ModelSection
    data: DataSection
    optimization: OptimizationSection = OptimizationSection()
    lora: LoraSection | None = None
    evaluation: EvaluationSection = EvaluationSection()
    checkpointing: CheckpointingSection
    runtime: RuntimeSection = RuntimeSection()

    def __init__(self, **sections: Any) -> None:
        try:
            super().__init__(**sections)
        except ConfigError as error:  # name the fields by their flat names, as users type them
            problems = getattr(error, "problems", None)
            if not problems:
                raise
            problem = ConfigError("; ".join(describe_problems(problems, str)))
            problem.problems = problems  # type: ignore[attr-defined]
            raise problem from None

    @model_validator(mode="after")
    def _across_sections(self) -> "TrainConfig":
        if self.lora is None:
            if not self.model.train:
                raise ValueError("train='none' leaves nothing to train (it goes with LoRA: use_lora)")
            return self
        overlap = [part for part in self.lora.parts if part in self.model.train]
        if overlap:
            raise ValueError(f"{', '.join(overlap)} is both in train (trained in full) and in lora_parts (adapted "
                             "with LoRA): choose one")
        if self.runtime.strategy == "fsdp":
            raise ValueError("LoRA trains a small adapter on a frozen base: use strategy ddp (the default; the frozen "
                             "base is replicated), fsdp does not shard LoRA runs")
        if self.model.name is None:
            raise ValueError("lora needs model (a VLM recipe or a saved / trained VLM), the base the adapter applies "
                             "to; encoder + decoder pairs have no single name to record")
        return self

    # --------------------------------------------------------------------------------------- flat names

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from flat names (``max_steps=30``, aliases such as ``lr`` too) and / or whole sections
        (``optimization={"max_steps": 30}``), applied over ``base``'s options."""
        return cls.from_flat(combine(base.flat() if base is not None else {}, flatten(fields)))

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """A config from options by their primary flat names (as `flatten` gives them)."""
        values = dict(values)
        use_lora = values.pop("use_lora", False)
        sections: dict[str, Any] = {"model": {}, "data": {}, "checkpointing": {}}  # required: missing leaves named
        lora_given = []
        for name, value in values.items():
            path = FLAT_FIELDS[name].path
            if path[0] == "lora":
                lora_given.append(name)
            _set(sections, path, value)
        if not use_lora:
            if lora_given:
                raise ConfigError(f"{', '.join(sorted(lora_given))} set, but LoRA is off: turn it on with use_lora "
                                  "(--use-lora) or lora=RANK (--lora RANK)")
            sections["lora"] = None
        else:
            sections.setdefault("lora", {})
        return cls(**sections)

    def flat(self) -> dict[str, Any]:
        """Every option by its primary flat name (``use_lora`` for the LoRA switch; LoRA options only with it)."""
        dumped = self.model_dump()
        values: dict[str, Any] = {"use_lora": self.lora is not None}
        for name, field in FLAT_FIELDS.items():
            if name == "use_lora" or (field.path[0] == "lora" and self.lora is None):
                continue
            values[name] = _get(dumped, field.path)
        return values

    # ------------------------------------------------------------------------------------------ derived

    @property
    def lora_settings(self) -> LoraSettings | None:
        return None if self.lora is None else self.lora.settings

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """Every part with trained weights: in full or through LoRA, in model order."""
        adapted = self.lora.parts if self.lora is not None else ()
        return tuple(part for part in PARTS if part in self.model.train or part in adapted)

    def resolved(self, defaults: Any, context_length: int) -> "Settings":
        """The options left at None filled in from the model's training defaults (`TrainingDefaults`)."""
        optimization = self.optimization
        lrs = {}
        for part in self.trained_parts:
            own = getattr(optimization.part_learning_rates, part)
            peak = optimization.learning_rate
            lrs[part] = own if own is not None else peak if peak is not None else getattr(defaults, f"lr_{part}")
            if lrs[part] == 0:
                raise ConfigError(
                    f"the model's default learning rate for the {part} is 0 (frozen): give lr_{part} "
                    f"(--lr-{part}) or leave the {part} out of train"
                )
        return Settings(
            batch_size=optimization.batch_size or defaults.batch_size,
            grad_accum=optimization.gradient_accumulation_steps or defaults.gradient_accumulation_steps,
            grad_clip=defaults.max_grad_norm if optimization.max_grad_norm is None else optimization.max_grad_norm,
            max_length=self.data.max_length or min(defaults.max_length, context_length),
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


# ------------------------------------------------------------------------------------------------ flat names


@dataclass(frozen=True)
class FlatField:
    """One option by its flat name: where it lives in the sections, its pydantic field (type, default,
    description, bounds), and the other names it answers to."""

    name: str
    path: tuple[str, ...]
    info: FieldInfo
    aliases: tuple[str, ...] = ()

    @property
    def annotation(self) -> Any:
        return self.info.annotation


def _leaves(model: type[Options], path: tuple[str, ...]) -> list[FlatField]:
    fields = []
    for name, info in model.model_fields.items():
        kind = _section_type(info.annotation)
        if kind is not None:
            fields += _leaves(kind, (*path, name))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flat = str(extra.get("flat", name))
        fields.append(FlatField(flat, (*path, name), info, tuple(extra.get("aliases", ()))))  # type: ignore[arg-type]
    return fields


def _section_type(annotation: Any) -> type[Options] | None:
    """The section class of a field's annotation (``LoraSection | None`` -> ``LoraSection``), else None."""
    for kind in (annotation, *typing.get_args(annotation)):
        if isinstance(kind, type) and issubclass(kind, Options):
            return kind
    return None


def _flat_fields() -> dict[str, FlatField]:
    switch = FlatField("use_lora", ("lora",), FieldInfo(
        annotation=bool, default=False, description="train LoRA adapters (peft) of lora_parts instead of their "
        "weights; the run saves the adapter alone (needs tinyvlm[lora])"))
    fields: dict[str, FlatField] = {}
    for field in _leaves(TrainConfig, ()):
        if field.path[0] == "lora" and switch.name not in fields:
            fields[switch.name] = switch  # the switch first, then the LoRA options
        fields[field.name] = field
    every = [name for field in fields.values() for name in (field.name, *field.aliases)]
    assert len(every) == len(set(every)), "two options share a flat name"
    return fields


#: Every option by its primary flat name.
FLAT_FIELDS: dict[str, FlatField] = _flat_fields()
#: ``lora=RANK``: the older LoRA switch, ``use_lora`` and ``lora_rank`` in one.
LORA_SHORTHAND = "lora"
#: Every name an option answers to -> its primary flat name.
FLAT_NAMES: dict[str, str] = {name: field.name for field in FLAT_FIELDS.values() for name in (field.name, *field.aliases)}
_FLAT_BY_PATH: dict[tuple[str, ...], str] = {field.path: field.name for field in FLAT_FIELDS.values()
                                              if field.name != "use_lora"}
#: Sections inside sections (``data.min_ratings``, ``optimization.part_learning_rates``).
_SUBSECTIONS = {path[:2] for path in _FLAT_BY_PATH if len(path) == 3}
#: Options that may change on ``resume``: they change how the run goes, not what it computes. ``max_steps``
#: may grow too (the run is extended), checked against the checkpoint's step.
RESUMABLE_CHANGES = {"resume", "dataloader_num_workers", "dataloader_prefetch_factor", "progress", "device",
                     "logging_steps", "gradient_checkpointing", "report_to", "project", "threads", "max_steps"}


def flatten(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Options by their primary flat names, from flat names, aliases and whole sections (a section name with a
    dict or a section object; ``lora=None`` is ``use_lora=False``). Names are checked, values are not."""
    flat: dict[str, Any] = {}
    given: dict[str, str] = {}

    def put(name: str, value: Any, typed: str) -> None:
        if name in given:
            raise ConfigError(f"{typed} and {given[name]} are the same option ({name}): give it once")
        given[name] = typed
        flat[name] = value

    for key, value in fields.items():
        section = TrainConfig.model_fields.get(key)
        if section is not None and (isinstance(value, (Mapping, Options)) or (key == "lora" and value is None)):
            if value is None:
                put("use_lora", False, key)
                continue
            if key == "lora":
                put("use_lora", True, key)
            for path, leaf in _section_leaves(key, value):
                put(_FLAT_BY_PATH[path], leaf, ".".join(path))
            continue
        if key == LORA_SHORTHAND:
            put("use_lora", value is not None, key)
            if value is not None:
                put("lora_rank", value, key)
            continue
        if key not in FLAT_NAMES:
            raise ConfigError(f"unknown option {key}{_did_you_mean(key, FLAT_NAMES)}")
        put(FLAT_NAMES[key], value, key)
    return flat


def _section_leaves(section: str, value: Mapping[str, Any] | Options) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, value)`` of every leaf given in a section (a dict, with nested dicts for its sub-sections)."""
    items = value.model_dump() if isinstance(value, Options) else dict(value)
    leaves = []
    for key, item in items.items():
        path = (section, key)
        if path in _SUBSECTIONS and isinstance(item, Mapping):
            leaves += [((*path, sub), leaf) for sub, leaf in item.items()]
        else:
            leaves.append((path, item))
    for path, _ in leaves:
        if path not in _FLAT_BY_PATH:
            known = [".".join(p) for p in _FLAT_BY_PATH if p[:-1] == path[:-1]]
            raise ConfigError(f"unknown option {'.'.join(path)}{_did_you_mean('.'.join(path), known)}")
    return leaves


def combine(lower: Mapping[str, Any], upper: Mapping[str, Any]) -> dict[str, Any]:
    """Flat options ``upper`` over ``lower`` (``use_lora=False`` in ``upper`` drops ``lower``'s LoRA options)."""
    if upper.get("use_lora") is False:
        lower = {name: value for name, value in lower.items() if FLAT_FIELDS[name].path[0] != "lora"}
    return {**lower, **upper}


def _did_you_mean(name: str, valid: Any) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def describe_problems(problems: list[Any], name: Callable[[str], str]) -> list[str]:
    """pydantic's problems of a `TrainConfig`, one line each, every option written ``name(flat name)``."""
    lines = []
    for item in _leaf_problems(problems, ()):
        where = ".".join(item["loc"])
        flat = _FLAT_BY_PATH.get(item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown option {where}")
            continue
        if flat is None and item["type"] != "missing":
            item = {**item, "loc": ()}  # a section's own rule (across its fields): its message says it all
        lines += describe_options(TrainConfig, [item], lambda field: name(flat) if flat is not None else field)
    return lines


def _leaf_problems(problems: list[Any], prefix: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The problems with their whole path: a section validated inside `TrainConfig` reports its own problems
    (`tinyvlm.config.Options`) as one error of the section, unpacked here."""
    for item in problems:
        where = (*prefix, *(str(part) for part in item["loc"]))
        nested = getattr((item.get("ctx") or {}).get("error"), "problems", None)
        if nested:
            yield from _leaf_problems(nested, where)
        else:
            yield {**item, "loc": where}


def make_config(base: TrainConfig | None = None, /, **fields: Any) -> TrainConfig:
    """Validate ``fields`` (flat names or sections, over ``base``'s options) into a `TrainConfig`, with one
    readable `ConfigError`."""
    try:
        return TrainConfig.from_fields(fields, base=base)
    except ConfigError as error:
        raise ConfigError(f"invalid training options: {error}") from None


def saved_config(values: Mapping[str, Any]) -> TrainConfig:
    """The config a checkpoint's ``state.json`` holds: sections, or the flat options of tinyvlm before sections
    (their names are the aliases; the LoRA options without a rank and ``val_fraction`` beside ``val_data``,
    which the old config wrote with their defaults, are dropped)."""
    if "checkpointing" in values:
        return TrainConfig(**values)
    legacy = dict(values)
    if legacy.get("lora") is None:
        for name in [name for name in legacy if name.startswith("lora_")]:
            del legacy[name]
    if legacy.get("val_data") is not None:
        legacy.pop("val_fraction", None)
    return TrainConfig.from_fields(legacy)
