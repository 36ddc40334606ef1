"""`train`: fine-tune a VLM on JSONL conversations, from one CPU to many GPUs under ``torchrun``.

The loop, in order of what happens at each optimizer step ``s``:

* the `StepSampler` names this process's micro-batches of step ``s`` (a pure function of ``s``, the seed and
  the world size, so resuming needs nothing but ``s``);
* the learning rate of every part is set from the schedule (linear warm-up, then cosine to
  ``min_lr_ratio * lr``);
* each micro-batch's summed token loss is divided by the number of target tokens of the *whole* step (all
  micro-batches, all processes), so accumulation and data parallelism give the gradient of one big batch;
* gradients are clipped, AdamW steps, and every ``checkpoint_every`` steps rank 0 writes model, optimizer,
  RNG states and step to a temporary folder that is then renamed into place.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on GPU, gloo on
CPU); only rank 0 writes files or prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from tinyvlm.data import (
    IGNORE_INDEX,
    Batch,
    Collator,
    ExampleDataset,
    Record,
    StepSampler,
    encode_records,
    read_records,
    split_records,
)
from tinyvlm.errors import ConfigError

PARTS = ("encoder", "projector", "decoder")
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
FINAL = "model"
#: Fields that may change when resuming without changing the trajectory.
RESUMABLE_CHANGES = {"resume", "workers", "progress", "device", "log_every"}


class TrainConfig(BaseModel):
    """Every option of `train` / ``tinyvlm train``; validated before anything is built."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    data: Path
    output: Path
    model: str | None = Field(None, description="a VLM: a 'vlm' zoo recipe or a saved VLM folder (local-dir:)")
    encoder: str | None = None
    decoder: str | None = None
    projector: str | None = Field(None, description="with encoder + decoder; default pixel-shuffle-mlp")
    pretrained: bool = Field(True, description="load the parts' pretrained weights (not for saved VLMs)")
    train: str = Field("projector", description="'projector', 'all' or a comma list of encoder,projector,decoder")
    max_steps: int | None = Field(None, ge=1, description="default: one pass over the training split")
    # None: the model's training defaults (`VLMConfig.training`; nanoVLM's unless a recipe says otherwise)
    batch_size: int | None = Field(None, ge=1, description="samples per micro-batch and process")
    grad_accum: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, description="every trained part's learning rate")
    lr_encoder: float | None = Field(None, gt=0)
    lr_projector: float | None = Field(None, gt=0)
    lr_decoder: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay of matrices (not of norms and biases)")
    warmup_steps: int | None = Field(None, ge=0, description="default: 5% of max_steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(None, ge=0, description="gradient-norm clipping; 0 for none")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = False
    pack: bool = False
    max_length: int | None = Field(None, ge=1, description="longest sample (and packed row) in tokens")
    val_data: Path | None = None
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held out from data when val_data is not given")
    eval_every: int = Field(0, ge=0, description="0: only after the last step")
    eval_samples: int = Field(256, ge=0, description="held-out records answered for exact-match accuracy")
    max_new_tokens: int = Field(32, ge=1)
    checkpoint_every: int = Field(500, ge=0, description="0: no checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    resume: bool = False
    device: str | None = None
    workers: int = Field(0, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.model is not None and (self.encoder is not None or self.decoder is not None):
            raise ValueError("give either model (a VLM recipe or folder) or encoder + decoder, not both")
        if self.model is None and (self.encoder is None or self.decoder is None):
            raise ValueError("give model (a VLM recipe or folder), or both encoder and decoder")
        if self.model is not None and self.projector is not None:
            raise ValueError("projector goes with encoder + decoder; a model (recipe or folder) has its own")
        if self.val_data is not None and "val_fraction" in self.model_fields_set:
            raise ValueError("give val_data or val_fraction, not both")
        parse_parts(self.train)
        return self

    @property
    def parts(self) -> tuple[str, ...]:
        return parse_parts(self.train)

    def resolved(self, defaults: Any, context_length: int) -> "Settings":
        """The options left at None filled in from the model's training defaults (`TrainingDefaults`)."""
        lrs = {}
        for part in self.parts:
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
    """``'all'`` / ``'projector'`` / ``'projector,decoder'`` -> the trained parts, in model order."""
    names = {name.strip() for name in spec.split(",") if name.strip()}
    if names == {"all"}:
        return PARTS
    unknown = names - set(PARTS)
    if unknown or not names:
        raise ValueError(f"train={spec!r}: expected 'all' or a comma list of {', '.join(PARTS)}")
    return tuple(part for part in PARTS if part in names)


def make_config(**options: Any) -> TrainConfig:
    """Validate ``options`` into a `TrainConfig`, with one readable `ConfigError`."""
    try:
        return TrainConfig(**options)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown option {where!r} (valid: {', '.join(TrainConfig.model_fields)})")
            else:
                problems.append(f"{where + ': ' if where else ''}{item['msg']}")
        raise ConfigError("invalid training options: " + "; ".join(problems)) from None


# ------------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up to 1 over ``warmup_steps``
    (step 0 already trains at ``1 / warmup_steps``), then a cosine from 1 down to ``min_lr_ratio`` at the
    last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Processes:
    """This process's place in a ``torchrun`` job (world size 1 without one)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_processes(device: str | None) -> Processes:
    """Join the ``torchrun`` process group if there is one: NCCL and ``cuda:LOCAL_RANK`` on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ model


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """The VLM to train, in float32 (the optimizer's master weights), on ``device``."""
    from tinyvlm.registry import get_spec
    from tinyvlm.vlm import build_vlm, load_vlm

    torch.manual_seed(config.seed)  # random-init parts are the same in every process and every resume
    if config.encoder is not None:
        return build_vlm(
            config.encoder, config.decoder, config.projector,
            pretrained=config.pretrained, dtype=torch.float32, device=device,
        )
    if config.model.startswith(("local-dir:", "hf-hub:")) or get_spec(config.model, kind="vlm").trained:
        return load_vlm(config.model, dtype=torch.float32, device=device)  # a saved or trained VLM
    return build_vlm(config.model, pretrained=config.pretrained, dtype=torch.float32, device=device)


def freeze(vlm: nn.Module, parts: Sequence[str]) -> None:
    """Parts not in ``parts`` stop requiring gradients and go to eval mode; the others train."""
    for part in PARTS:
        module: nn.Module = getattr(vlm, part)
        module.requires_grad_(part in parts)
        module.train(part in parts)


def param_groups(vlm: nn.Module, config: TrainConfig, lrs: dict[str, float]) -> list[dict[str, Any]]:
    """Two AdamW groups per trained part: matrices with weight decay, norms / biases / vectors without."""
    groups = []
    seen: set[int] = set()
    for part in config.parts:
        params = [p for p in getattr(vlm, part).parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        lr = lrs[part]
        for name, members, wd in ((part, decay, config.weight_decay), (f"{part}.no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": name, "params": members, "lr": lr, "peak_lr": lr, "weight_decay": wd})
    if not groups:
        raise ConfigError(f"train={config.train!r} leaves nothing to train")
    return groups


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints under ``output``, oldest first (temporary folders of interrupted saves ignored)."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "state.json").is_file())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value for index, entry in state["state"].items()
               for key, value in entry.items()}
    groups = [{k: v for k, v in group.items() if k != "params"} | {"params": group["params"]}
              for group in state["param_groups"]]
    return tensors, groups


def save_checkpoint(
    output: Path, step: int, vlm: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, keep: int
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically (temporary folder, then rename); keep the last ``keep``."""
    folder = output / CHECKPOINTS
    final = folder / f"step-{step:08d}"
    temporary = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(vlm, str(temporary / "model.safetensors"))
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary / "optimizer.safetensors"))
    state = {"step": step, "param_groups": groups, "python_rng": _jsonable(random.getstate()),
             "config": config.model_dump(mode="json")}
    (temporary / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    for old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def check_resumable(folder: Path, config: TrainConfig) -> None:
    """Refuse to resume with options that change the trajectory (everything but `RESUMABLE_CHANGES`)."""
    saved = json.loads((folder / "state.json").read_text())["config"]
    current = config.model_dump(mode="json")
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {folder}: options changed since it was written ({diffs}). Resume with the same "
            "options, or start a new run in another output folder."
        )


def load_checkpoint(folder: Path, vlm: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from."""
    state = json.loads((folder / "state.json").read_text())
    load_model(vlm, str(folder / "model.safetensors"), strict=True)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(state["python_rng"]))
    return int(state["step"])


# ------------------------------------------------------------------------------------------------ logging


class Progress:
    """One status line on a terminal (``step 120/500 | loss 1.234 | 5.3k tok/s | ETA 1:23``), or a plain
    line every ``log_every`` steps when stderr is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.began = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, *, force: bool = False) -> None:
        if not self.enabled or not (self.tty or force):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
        line = (f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {_human(tokens_per_s)} tok/s | "
                f"ETA {_clock(eta)}")
        if self.tty:
            sys.stderr.write("\r" + line + "\033[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _human(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class MetricsLog:
    """Appends one JSON object per line to ``output/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines a killed run wrote after the checkpoint it resumes from (they will be written again)."""
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **values: Any) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")


# ------------------------------------------------------------------------------------------------ steps


def summed_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Sum of the cross-entropy over the batch's target tokens (the model averages; we need sums to weight
    micro-batches and processes by their token counts)."""
    output = model(
        batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
        labels=batch.labels, position_ids=batch.position_ids,
    )
    return output.loss * output.num_labels


def target_count(batch: Batch) -> int:
    """Positions that carry a loss: position ``t`` predicts ``labels[t + 1]``."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def normalize_answer(text: str) -> str:
    """Exact match ignores case and surrounding / repeated whitespace."""
    return " ".join(text.split()).lower()


@torch.no_grad()
def evaluate(
    vlm: nn.Module, batches: Iterator[Batch], records: Sequence[Record], *, eval_samples: int, batch_size: int,
    max_new_tokens: int, processes: Processes, autocast: Any,
) -> dict[str, float]:
    """Held-out loss (this process's share of the batches, summed over processes) and exact-match accuracy of
    greedy answers to the first ``eval_samples`` records (shared out between processes)."""
    modes = {name: module.training for name, module in vlm.named_children()}
    vlm.eval()
    loss_sum, targets = 0.0, 0
    for batch in batches:
        batch = batch.to(processes.device)
        with autocast:
            loss_sum += float(summed_loss(vlm, batch))
        targets += target_count(batch)
    chosen = list(records[:eval_samples])[processes.rank :: processes.world_size]
    correct = 0
    for start in range(0, len(chosen), batch_size):
        group = chosen[start : start + batch_size]
        with autocast:
            answers = vlm.generate(
                [r.prompt for r in group], images=[list(r.images) for r in group], max_new_tokens=max_new_tokens
            )
        correct += sum(normalize_answer(a) == normalize_answer(r.answer) for a, r in zip(answers, group))
    loss_sum, targets, correct, answered = processes.all_sum([loss_sum, targets, correct, len(chosen)])
    for name, module in vlm.named_children():
        module.train(modes[name])
    return {
        "val_loss": loss_sum / max(targets, 1),
        "val_accuracy": correct / max(answered, 1),
        "val_answered": int(answered),
    }


# ------------------------------------------------------------------------------------------------ train


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns: where the model went and the last figures."""

    model_dir: Path
    steps: int
    final_loss: float
    metrics: dict[str, float]


def train(**options: Any) -> TrainResult:
    """Fine-tune a VLM; the options are `TrainConfig`'s fields (the flags of ``tinyvlm train``)."""
    return run(make_config(**options))


def run(config: TrainConfig) -> TrainResult:
    processes = start_processes(config.device)
    try:
        return _run(config, processes)
    finally:
        if processes.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, processes: Processes) -> TrainResult:
    output = config.output
    existing = checkpoint_dirs(output)
    if config.resume and not existing:
        raise ConfigError(f"--resume: no checkpoint under {output / CHECKPOINTS} to resume from")
    if not config.resume and (existing or (output / METRICS).exists()):
        raise ConfigError(
            f"{output} already holds a training run; pass --resume to continue it or choose another --output"
        )
    if config.resume:
        check_resumable(existing[-1], config)
    progress = Progress(0, 0, config.progress and processes.main)

    records = read_records(config.data)
    if config.val_data is not None:
        train_records, val_records = records, read_records(config.val_data)
    else:
        train_records, val_records = split_records(records, config.val_fraction, config.seed)

    vlm = build_model(config, processes.device)
    settings = config.resolved(vlm.config.training, vlm.decoder.config.max_position_embeddings)
    freeze(vlm, config.parts)
    processor = vlm.processor
    encode = dict(encode=processor.encode_example, max_length=settings.max_length,
                  needs_image_sizes=processor.tokens.split_images)
    train_examples = encode_records(train_records, **encode)
    val_examples = encode_records(val_records, **encode)
    collator = Collator(pad_id=processor.pad_token_id, packed=config.pack, max_length=settings.max_length)
    batch_size = settings.batch_size

    sampler = StepSampler(
        len(train_examples), micro_batch=batch_size, world_size=processes.world_size,
        rank=processes.rank, accumulation=settings.grad_accum, seed=config.seed,
    )
    max_steps = config.max_steps or max(1, math.ceil(len(train_examples) / sampler.global_batch))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * max_steps)
    progress.total = max_steps

    optimizer = torch.optim.AdamW(
        param_groups(vlm, config, settings.lrs), betas=(0.9, 0.95), eps=1e-8,
        fused=processes.device.type == "cuda",
    )
    start = 0
    metrics = MetricsLog(output / METRICS, processes.main)
    if config.resume:
        start = load_checkpoint(existing[-1], vlm, optimizer)
        metrics.truncate_after(start)
        progress.message(f"resumed from {existing[-1]} (step {start})")
    if processes.main:
        output.mkdir(parents=True, exist_ok=True)
    processes.barrier()

    model: nn.Module = torch.compile(vlm) if config.compile else vlm
    if processes.world_size > 1:
        ids = [processes.device.index] if processes.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and processes.device.type == "cuda")
    autocast = torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def loader(index_lists: Iterator[list[int]], dataset: ExampleDataset) -> Iterator[Batch]:
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=list(index_lists), collate_fn=collator, num_workers=config.workers,
            pin_memory=processes.device.type == "cuda",
        ))

    train_set = ExampleDataset(train_examples, processor.pixel_values)
    val_set = ExampleDataset(val_examples, processor.pixel_values)

    def run_eval() -> dict[str, float]:
        starts = range(processes.rank * batch_size, len(val_set), processes.world_size * batch_size)
        index_lists = ([*range(i, min(i + batch_size, len(val_set)))] for i in starts)
        return evaluate(
            vlm, loader(index_lists, val_set), val_records, eval_samples=config.eval_samples,
            batch_size=batch_size, max_new_tokens=config.max_new_tokens, processes=processes, autocast=autocast,
        )

    batches = loader(sampler.iterate(start, max_steps), train_set)
    progress.began = time.perf_counter()
    window_tokens, window_time, loss = 0.0, 0.0, float("nan")  # tokens/s counts training steps only
    last_eval: dict[str, float] = {}
    for step in range(start, max_steps):
        step_began = time.perf_counter()
        factor = lr_factor(step, max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        micro = [next(batches).to(processes.device) for _ in range(settings.grad_accum)]
        targets, tokens = processes.all_sum([sum(target_count(b) for b in micro), sum(b.num_tokens for b in micro)])
        loss_sum = torch.zeros((), dtype=torch.float64, device=processes.device)
        for j, batch in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or processes.world_size == 1 else model.no_sync()
            with sync:
                with autocast:
                    summed = summed_loss(model, batch)
                # DDP averages gradients over processes: scaled so that the result is the gradient of the
                # mean over every target token of the step, whatever the split into micro-batches.
                (summed * (processes.world_size / max(targets, 1))).backward()
            loss_sum += summed.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, settings.grad_clip if settings.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = processes.all_sum([float(loss_sum)])[0] / max(targets, 1)
        window_tokens += tokens
        window_time += time.perf_counter() - step_began
        tokens_per_s = window_tokens / max(window_time, 1e-9)
        done = step + 1
        if done % config.log_every == 0 or done == max_steps:
            metrics.write(
                step=done, epoch=round(sampler.epoch(done), 4), loss=loss,
                lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                grad_norm=float(grad_norm), tokens_per_s=tokens_per_s, time=time.time(),
            )
            progress.update(done, loss, tokens_per_s, force=True)
            window_tokens, window_time = 0.0, 0.0
        else:
            progress.update(done, loss, tokens_per_s)
        if val_records and config.eval_every and done % config.eval_every == 0 and done != max_steps:
            last_eval = run_eval()
            metrics.write(step=done, **last_eval)
            progress.message(_eval_line(done, last_eval))
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == max_steps):
            if processes.main:
                save_checkpoint(output, done, vlm, optimizer, config, config.keep_checkpoints)
            processes.barrier()
    progress.close()
    if val_records:
        last_eval = run_eval()
        metrics.write(step=max_steps, **last_eval)
        progress.message(_eval_line(max_steps, last_eval))
    model_dir = output / FINAL
    if processes.main:
        vlm.save_pretrained(model_dir)
        progress.message(f"saved the model to {model_dir} (load it with tinyvlm.load_vlm('local-dir:{model_dir}'))")
    processes.barrier()
    return TrainResult(model_dir=model_dir, steps=max_steps, final_loss=loss, metrics=last_eval)


def _eval_line(step: int, values: dict[str, float]) -> str:
    line = f"step {step}: held-out loss {values['val_loss']:.4f}"
    if values["val_answered"]:
        line += f", exact match {values['val_accuracy']:.1%} of {values['val_answered']}"
    return line
