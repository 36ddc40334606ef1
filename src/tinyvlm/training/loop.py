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

With ``lora`` (a rank), the ``lora_parts`` get peft LoRA layers (`tinyvlm.lora.adapter.add_lora`): their base
weights stay frozen, the adapters and the parts in ``train`` are trained, and checkpoints and the final save
hold the adapter alone (``adapter/``: peft's files), which applies to the base named by ``model``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on GPU, gloo on
CPU); only rank 0 writes files or prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
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
from tinyvlm.training.checkpoints import CHECKPOINTS, check_resumable, checkpoint_dirs, load_checkpoint, save_checkpoint
from tinyvlm.training.config import PARTS, TrainConfig, make_config
from tinyvlm.training.distributed import Processes, start_processes
from tinyvlm.training.progress import MetricsLog, Progress

METRICS = "metrics.jsonl"
FINAL = "model"
ADAPTER = "adapter"


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


# ------------------------------------------------------------------------------------------------ model


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """The VLM to train, in float32 (the optimizer's master weights), on ``device``, in the training layout."""
    from tinyvlm.vlm.building import build_vlm, open_vlm

    torch.manual_seed(config.seed)  # random-init parts are the same in every process and every resume
    if config.encoder is not None:
        return build_vlm(
            config.encoder, config.decoder, config.projector,
            pretrained=config.pretrained, dtype=torch.float32, device=device,
        )
    lora = config.lora_settings
    if lora is None:
        return open_vlm(config.model, pretrained=config.pretrained, dtype=torch.float32, device=device)
    from tinyvlm.lora.adapter import add_lora, rebuildable_base

    base, revision = rebuildable_base(config.model, pretrained=config.pretrained, full_parts=config.parts)
    vlm = open_vlm(config.model, pretrained=config.pretrained, dtype=torch.float32, device=device)
    return add_lora(vlm, lora, full_parts=config.parts, base_name=base, base_revision=revision)


def freeze(vlm: nn.Module, parts: Sequence[str], lora_parts: Sequence[str] = ()) -> None:
    """Parts not in ``parts`` stop requiring gradients and go to eval mode; the others train. Parts in
    ``lora_parts`` train too, with only their LoRA weights requiring gradients (as `add_lora` left them)."""
    for part in PARTS:
        module: nn.Module = getattr(vlm, part)
        if part not in lora_parts:
            module.requires_grad_(part in parts)
        module.train(part in parts or part in lora_parts)


def param_groups(vlm: nn.Module, config: TrainConfig, lrs: dict[str, float]) -> list[dict[str, Any]]:
    """Two AdamW groups per trained part: matrices with weight decay, norms / biases / vectors without (a
    LoRA-adapted part's groups, ``decoder.lora``, hold its LoRA weights)."""
    groups = []
    seen: set[int] = set()
    for part in config.trained_parts:
        params = [p for p in getattr(vlm, part).parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        lr = lrs[part]
        label = part if part in config.parts else f"{part}.lora"
        for name, members, wd in ((label, decay, config.weight_decay), (f"{label}.no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": name, "params": members, "lr": lr, "peak_lr": lr, "weight_decay": wd})
    if not groups:
        raise ConfigError(f"train={config.train!r} leaves nothing to train")
    return groups


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
    """What `train` returns: where the model went (``model_dir``; with LoRA the adapter, ``adapter_dir``,
    and ``model_dir`` None) and the last figures."""

    model_dir: Path | None
    steps: int
    final_loss: float
    metrics: dict[str, float]
    adapter_dir: Path | None = None


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
    lora = config.lora_settings
    freeze(vlm, config.parts, lora.parts if lora is not None else ())
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
        # Its own generator: a loader seeded from the global RNG would draw from it when created, which on
        # resume happens after the checkpoint's RNG state is restored (dropout masks would then differ).
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=list(index_lists), collate_fn=collator, num_workers=config.workers,
            pin_memory=processes.device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
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
    if lora is not None:
        from tinyvlm.lora.adapter import save_adapter

        adapter_dir = output / ADAPTER
        if processes.main:
            save_adapter(vlm, adapter_dir)
            progress.message(f"saved the LoRA adapter to {adapter_dir} (load it with "
                             f"tinyvlm.load_vlm({config.model!r}, adapter='{adapter_dir}'))")
        processes.barrier()
        return TrainResult(model_dir=None, steps=max_steps, final_loss=loss, metrics=last_eval, adapter_dir=adapter_dir)
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
