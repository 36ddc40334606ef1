"""`train`: fine-tune a VLM on conversations (JSONL files, parquet, Hugging Face datasets), from one CPU to
many GPUs under ``torchrun``.

The loop, in order of what happens at each optimizer step ``s``:

* the data stream (`tinyvlm.data.stream`) hands this process its micro-batches of step ``s``: the same
  global order whatever the number of processes, and restored exactly on resume from the data position
  each checkpoint saves; DataLoader workers decode, encode and collate them ahead;
* the learning rate of every part is set from the schedule (linear warm-up, then cosine to
  ``min_lr_ratio`` times the peak at step ``max_steps``; a run resumed with a larger ``max_steps`` continues
  on the schedule of the new total);
* each micro-batch's summed token loss is divided by the number of target tokens of the *whole* step (all
  micro-batches, all processes), so accumulation and data parallelism give the gradient of one big batch;
* gradients are clipped, AdamW steps, and every ``save_steps`` steps rank 0 writes model, optimizer, RNG
  states and step to a temporary folder that is then renamed into place.

With a ``lora`` section, its ``parts`` get peft LoRA layers (`tinyvlm.interop.lora.add_lora`): their base
weights stay frozen, the adapters and the parts in ``model.train`` are trained, and checkpoints and the final
save hold the adapter alone (``adapter/``: peft's files), which applies to the base named by ``model.name``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on GPU, gloo on
CPU), or sharded with FSDP2 (``strategy="fsdp"``, `tinyvlm.training.strategies`); only rank 0 writes files or
prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tinyvlm.api import build_vlm, load_vlm
from tinyvlm.data.answers import normalize_answer
from tinyvlm.data.loading import Collator, MicroBatch, SampleMaker, filler_batch, load, skipped_message
from tinyvlm.data.records import IGNORE_INDEX, Batch, open_image
from tinyvlm.errors import ConfigError
from tinyvlm.inference.prepare import prepare_for_training
from tinyvlm.inference.threads import StepSize, ThreadTuner, fixed_threads
from tinyvlm.interop.lora import add_lora, rebuildable_base, save_adapter
from tinyvlm.interop.transformers import architecture_problems
from tinyvlm.sources import RUN_ADAPTER as ADAPTER, RUN_METRICS as METRICS, RUN_MODEL as FINAL, resolve  # a run's layout
from tinyvlm.training.checkpoints import (
    CHECKPOINTS, check_extends, check_resumable, checkpoint_dirs, load_checkpoint, read_data_position, save_checkpoint,
)
from tinyvlm.training.config import PARTS, TrainConfig, make_config
from tinyvlm.training.distributed import Processes, start_processes
from tinyvlm.training.inputs import Held, open_data, prepare_data
from tinyvlm.training.plot import curves_after_run
from tinyvlm.training.progress import MetricsLog, Progress
from tinyvlm.training.strategies import checkpoint_activations, make_strategy
from tinyvlm.training.tracking import check_installed, open_trackers
from tinyvlm.vlm.files import save_vlm


# ------------------------------------------------------------------------------------------------ schedule


def warmup_steps_for(config: TrainConfig, max_steps: int) -> int:
    """Warm-up steps: ``warmup_steps``, or 5 % of ``max_steps`` (recomputed when a resumed run is extended)."""
    warmup = config.optimization.warmup_steps
    return warmup if warmup is not None else round(0.05 * max_steps)


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
    """The VLM to train, in float32 (the optimizer's master weights), on ``device``, in the training layouts
    (`prepare_for_training`); its decoder quantized with ``runtime.quantize`` (QLoRA: the quantized weights stay
    frozen). ``model.name`` is resolved once: a name with files is loaded, a recipe built."""
    torch.manual_seed(config.runtime.seed)  # random-init parts are the same in every process and every resume
    chosen = config.model
    source = None if chosen.encoder is not None else resolve(chosen.name, "vlm")
    lora = config.lora_settings
    if lora is not None:
        base, revision = rebuildable_base(source, pretrained=chosen.pretrained, full_parts=chosen.train)
    options: dict[str, Any] = dict(dtype=torch.float32, device=device, quantize=config.runtime.quantize)
    if source is None:
        vlm = build_vlm(chosen.encoder, chosen.decoder, chosen.projector, pretrained=chosen.pretrained,
                        processor_kwargs={"token_layout": chosen.image_token_layout}, **options)
    elif source.has_files:
        vlm = load_vlm(source, **options)
    else:
        vlm = build_vlm(source, pretrained=chosen.pretrained, **options)
    prepare_for_training(vlm)
    if vlm.config.quantization is not None and "decoder" in chosen.train:
        raise ConfigError(
            f"the decoder is quantized ({vlm.config.quantization.mode}), so its weights cannot be trained in full: "
            "train LoRA adapters on it (--use-lora, lora_parts decoder), or train from the unquantized model"
        )
    if lora is None:
        return vlm
    return add_lora(vlm, lora, full_parts=chosen.train, base_name=base, base_revision=revision)


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
        label = part if part in config.model.train else f"{part}.lora"
        weight_decay = config.optimization.weight_decay
        for name, members, wd in ((label, decay, weight_decay), (f"{label}.no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": name, "params": members, "lr": lr, "peak_lr": lr, "weight_decay": wd})
    if not groups:
        raise ConfigError(f"train={','.join(config.model.train) or 'none'} leaves nothing to train")
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


@torch.no_grad()
def evaluate(
    vlm: nn.Module, batches: Iterator[MicroBatch], held_out: Sequence[Held], *, eval_samples: int, batch_size: int,
    max_new_tokens: int, processes: Processes, autocast: Any, progress: Progress,
) -> dict[str, float]:
    """Held-out loss (this process's share of the batches, summed over processes) and exact-match accuracy of
    greedy answers to the first ``eval_samples`` held-out samples (shared out between processes)."""
    modes = {name: module.training for name, module in vlm.named_children()}
    vlm.eval()
    chosen = [record for record, _ in held_out[:eval_samples]][processes.rank :: processes.world_size]
    loss_batches = math.ceil(len(held_out) / (batch_size * processes.world_size))
    answer_batches = math.ceil(len(chosen) / batch_size)
    loss_sum, targets, skipped = 0.0, 0, 0
    for done, micro in enumerate(batches, start=1):
        skipped += len(micro.skipped)
        if micro.batch is not None:
            batch = micro.batch.to(processes.device)
            with autocast:
                loss_sum += float(summed_loss(vlm, batch))
            targets += target_count(batch)
        progress.activity(f"evaluating: loss {done}/{loss_batches} batches")
    correct = 0
    for number, start in enumerate(range(0, len(chosen), batch_size), start=1):
        group = chosen[start : start + batch_size]
        progress.activity(f"evaluating: answers {number}/{answer_batches} batches")
        with autocast:
            answers = vlm.generate(
                [r.prompt for r in group], images=[[open_image(i) for i in r.images] for r in group],
                max_new_tokens=max_new_tokens,
            )
        correct += sum(normalize_answer(a) == normalize_answer(r.answer) for a, r in zip(answers, group))
    loss_sum, targets, correct, answered, skipped = processes.all_sum([loss_sum, targets, correct, len(chosen), skipped])
    for name, module in vlm.named_children():
        module.train(modes[name])
    values = {
        "val_loss": loss_sum / targets if targets else float("nan"),
        "val_accuracy": correct / max(answered, 1),
        "val_answered": int(answered),
    }
    if skipped:
        values["val_skipped"] = int(skipped)
    return values


# ------------------------------------------------------------------------------------------------ train


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns: where the model went (``model_dir``; with LoRA the adapter, ``adapter_dir``,
    and ``model_dir`` None) and the last figures."""

    model_dir: Path | None
    steps: int
    final_loss: float
    metrics: dict[str, float]
    #: Samples the run left out, never silently: ``too_long`` (longer than max_length), ``filtered_rows``
    #: (every turn dropped by the rating filters) and the ``dropped_turns`` of the rating filters.
    skipped: dict[str, int]
    adapter_dir: Path | None = None


def train(config: TrainConfig | None = None, **fields: Any) -> TrainResult:
    """Fine-tune a VLM: ``tinyvlm train`` in Python.

    ``config`` is a whole `TrainConfig` (its sections: model, data, optimization, lora, evaluation,
    checkpointing, runtime). ``fields`` are options by their flat names, the flags of ``tinyvlm train`` without
    dashes (``model="test-vlm", data="train.jsonl", output_dir="runs/a", max_steps=200, learning_rate=1e-3``;
    the older names such as ``lr`` and ``output`` too), or whole sections (``optimization={"max_steps": 200}``),
    applied over ``config``. An unknown name or a bad value is a `ConfigError` naming it. docs/training.md
    lists every option; so does ``tinyvlm train --help``."""
    return run(config if config is not None and not fields else make_config(config, **fields))


def run(config: TrainConfig) -> TrainResult:
    processes = start_processes(config.runtime.device, group=config.runtime.strategy == "fsdp")
    try:
        with contextlib.ExitStack() as cleanup:
            return _run(config, processes, cleanup)
    finally:
        if processes.grouped and dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, processes: Processes, cleanup: contextlib.ExitStack) -> TrainResult:
    runtime, evaluation, checkpointing = config.runtime, config.evaluation, config.checkpointing
    cleanup.enter_context(fixed_threads(runtime.threads))  # the run's count, restored when it ends
    output = checkpointing.output_dir
    existing = checkpoint_dirs(output)
    if checkpointing.resume and not existing:
        raise ConfigError(f"--resume: no checkpoint under {output / CHECKPOINTS} to resume from")
    if not checkpointing.resume and (existing or (output / METRICS).exists()):
        raise ConfigError(
            f"{output} already holds a training run; pass --resume to continue it or choose another --output-dir"
        )
    if checkpointing.resume:
        check_resumable(existing[-1], config)
    if processes.main:
        check_installed(runtime.report_to)
    progress = Progress(0, 0, show_bar=runtime.progress, main=processes.main)

    opened = open_data(config)
    strategy = make_strategy(runtime.strategy, processes)
    vlm = build_model(config, strategy.build_device)
    unexportable = architecture_problems(vlm)
    if unexportable:  # said now, not when `tinyvlm export` refuses the trained model
        progress.result("this model will not export to transformers: " + "; ".join(unexportable))
    settings = config.resolved(vlm.config.training, vlm.decoder.config.max_position_embeddings)
    lora = config.lora_settings
    freeze(vlm, config.model.train, lora.parts if lora is not None else ())
    processor = vlm.processor
    batch_size = settings.batch_size
    data = prepare_data(opened, config, processor, max_length=settings.max_length, batch_size=batch_size,
                        grad_accum=settings.grad_accum, world_size=processes.world_size, rank=processes.rank,
                        warn=progress.result)
    max_steps = data.max_steps
    if checkpointing.resume:
        check_extends(existing[-1], max_steps)
    # From max_steps on every start: extending a run (a larger max_steps on resume) stretches the warm-up (when it
    # is the default share) and the cosine to the new last step, as transformers' Trainer does on resume.
    warmup = warmup_steps_for(config, max_steps)
    progress.total = max_steps

    if runtime.gradient_checkpointing:
        checkpoint_activations(vlm)
    model = strategy.wrap(vlm, compile=runtime.torch_compile)
    optimizer = torch.optim.AdamW(
        param_groups(vlm, config, settings.lrs), betas=(0.9, 0.95), eps=1e-8,
        fused=processes.device.type == "cuda",
    )
    start, too_long = 0, 0
    metrics = MetricsLog(output / METRICS, processes.main)
    if checkpointing.resume:
        start = load_checkpoint(existing[-1], vlm, optimizer, strategy)
        position = read_data_position(existing[-1])
        data.mixture.restore(position)
        too_long = int(position["too_long"])
        metrics.truncate_after(start, final_step=max_steps)
        progress.message(f"resumed from {existing[-1]} (step {start})")
    if processes.main:
        output.mkdir(parents=True, exist_ok=True)
        if runtime.report_to:
            metrics.trackers = open_trackers(runtime.report_to, output, runtime.project, config.model_dump(mode="json"),
                                             resumed_step=start)
            cleanup.callback(metrics.close)
    processes.barrier()

    use_bf16 = runtime.precision == "bf16" or (runtime.precision == "auto" and processes.device.type == "cuda")
    autocast = torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    maker = SampleMaker(processor, max_length=settings.max_length)
    collator = Collator(pad_id=processor.pad_token_id, packed=config.data.pack, max_length=settings.max_length)

    def loader(index_lists: Iterable[list[Any]]) -> Iterator[MicroBatch]:
        return load(index_lists, maker, collator, workers=runtime.dataloader_num_workers,
                    prefetch_factor=runtime.dataloader_prefetch_factor, pin_memory=processes.device.type == "cuda",
                    seed=runtime.seed)

    def run_eval() -> dict[str, float]:
        items = [item for _, item in data.held_out]
        starts = range(processes.rank * batch_size, len(items), processes.world_size * batch_size)
        with strategy.full_weights(vlm):
            values = evaluate(
                vlm, loader(items[i : i + batch_size] for i in starts), data.held_out, eval_samples=evaluation.samples,
                batch_size=batch_size, max_new_tokens=evaluation.max_new_tokens, processes=processes, autocast=autocast,
                progress=progress,
            )
        progress.activity(None)
        return values

    def skipped_counts(step: int) -> dict[str, int]:
        counts = data.batches.state_at(step)["counts"]
        return {"too_long": too_long, "filtered_rows": counts["filtered_rows"], "dropped_turns": counts["dropped_turns"]}

    # One process on the CPU: each whole step (loading, forward, backward, optimizer: the optimizer's many small
    # per-tensor ops are parallel regions too) runs at all threads or one, whichever is faster now (tinyvlm.inference.threads).
    tuned = processes.device.type == "cpu" and processes.world_size == 1
    step_threads = ThreadTuner().step if tuned else (lambda: contextlib.nullcontext(StepSize()))
    filler = filler_batch(processor).to(processes.device) if processes.world_size > 1 else None
    batches = loader(data.batches.iterate(start, max_steps))
    progress.began = time.perf_counter()
    window_tokens, window_time, loss = 0.0, 0.0, float("nan")  # tokens/s counts training steps only
    last_eval: dict[str, float] = {}
    skipped_where: list[str] = []
    for step in range(start, max_steps):
        step_began = time.perf_counter()
        factor = lr_factor(step, max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=config.optimization.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        with step_threads() as step_size:
            loaded = [next(batches) for _ in range(settings.grad_accum)]
            micro = [None if m.batch is None else m.batch.to(processes.device) for m in loaded]
            skipped_where += [where for m in loaded for where in m.skipped][: 3 - len(skipped_where)]
            real = [b for b in micro if b is not None]
            targets, tokens, skipped = processes.all_sum([
                sum(target_count(b) for b in real), sum(b.num_tokens for b in real), sum(len(m.skipped) for m in loaded),
            ])
            too_long += int(skipped)
            loss_sum = torch.zeros((), dtype=torch.float64, device=processes.device)
            step_size.units = tokens
            # A micro-batch whose samples were all skipped is left out in one process (no all-reduce to take part in)
            ran = [j for j, batch in enumerate(micro) if batch is not None or filler is not None]
            for j in ran:
                batch = micro[j]
                with strategy.gradient_sync(model, j == ran[-1]):
                    with autocast:
                        # A micro-batch whose samples were all skipped runs the filler with a zero weight, so that
                        # this process still joins the gradient all-reduce of the others.
                        summed = summed_loss(model, batch) if batch is not None else summed_loss(model, filler) * 0
                    # DDP and FSDP average gradients over processes: scaled so that the result is the gradient of the
                    # mean over every target token of the step, whatever the split into micro-batches.
                    (summed * (processes.world_size / max(targets, 1))).backward()
                loss_sum += summed.detach().double()
            if targets:
                grad_norm = strategy.total_norm(torch.nn.utils.clip_grad_norm_(
                    trainable, settings.grad_clip if settings.grad_clip > 0 else float("inf")
                ))
                optimizer.step()
            else:  # every sample of the step was skipped: nothing to learn, the weights stay (in every process)
                grad_norm = 0.0
            optimizer.zero_grad(set_to_none=True)
        loss = processes.all_sum([float(loss_sum)])[0] / max(targets, 1)
        window_tokens += tokens
        window_time += time.perf_counter() - step_began
        tokens_per_s = window_tokens / max(window_time, 1e-9)
        done = step + 1
        if done % runtime.logging_steps == 0 or done == max_steps:
            length = data.mixture.length
            epoch = None if length is None else done * data.batches.global_batch / length
            counts = skipped_counts(done)
            metrics.write(
                step=done, epoch=None if epoch is None else round(epoch, 4), loss=loss,
                lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                grad_norm=grad_norm, tokens_per_s=tokens_per_s, time=time.time(), skipped=counts,
            )
            progress.update(done, loss, tokens_per_s, force=True, skipped=counts["too_long"] + counts["filtered_rows"])
            window_tokens, window_time = 0.0, 0.0
        else:
            progress.update(done, loss, tokens_per_s)
        if data.held_out and evaluation.steps and done % evaluation.steps == 0 and done != max_steps:
            last_eval = run_eval()
            metrics.write(step=done, **last_eval)
            progress.result(_eval_line(done, last_eval))
        if checkpointing.save_steps and (done % checkpointing.save_steps == 0 or done == max_steps):
            position = {**data.batches.state_at(done), "too_long": too_long}
            model_tensors = strategy.model_state(vlm)  # gathered on rank 0 under FSDP (every process takes part)
            optimizer_state = strategy.optimizer_state(vlm, optimizer)
            if processes.main:
                save_checkpoint(output, done, vlm, optimizer_state, config, checkpointing.save_total_limit,
                                data_position=position, model_tensors=model_tensors)
            processes.barrier()
    progress.close()
    counts = skipped_counts(max_steps)
    if any(counts.values()):
        progress.result(_skipped_line(counts, skipped_where, settings.max_length))
    if data.held_out:
        last_eval = run_eval()
        metrics.write(step=max_steps, **last_eval)
        progress.result(_eval_line(max_steps, last_eval))
    if processes.main:
        progress.result(curves_after_run(output))
    metrics.close()
    if lora is not None:

        adapter_dir = output / ADAPTER
        if processes.main:
            save_adapter(vlm, adapter_dir, overwrite=True)  # the run's own folder
            progress.result(f"saved the LoRA adapter to {adapter_dir} (load it with "
                             f"tinyvlm.load_vlm({config.model.name!r}, adapter='{adapter_dir}'))")
        processes.barrier()
        return TrainResult(model_dir=None, steps=max_steps, final_loss=loss, metrics=last_eval, skipped=counts,
                           adapter_dir=adapter_dir)
    model_dir = output / FINAL
    model_tensors = strategy.model_state(vlm)
    if processes.main:
        save_vlm(vlm, model_dir, tensors=model_tensors, overwrite=True)  # the run's own folder
        progress.result(f"saved the model to {model_dir} (load it with tinyvlm.load_vlm('local-dir:{model_dir}'))")
    processes.barrier()
    return TrainResult(model_dir=model_dir, steps=max_steps, final_loss=loss, metrics=last_eval, skipped=counts)


def _skipped_line(counts: dict[str, int], where: Sequence[str], max_length: int) -> str:
    parts = []
    if counts["too_long"]:
        parts.append(skipped_message(where, counts["too_long"], max_length))
    if counts["filtered_rows"]:
        parts.append(f"{counts['filtered_rows']} row(s) skipped: the rating filters dropped every turn")
    if counts["dropped_turns"]:
        parts.append(f"{counts['dropped_turns']} turn(s) dropped by the rating filters")
    return "data: " + "; ".join(parts)


def _eval_line(step: int, values: dict[str, float]) -> str:
    line = f"step {step}: held-out loss {values['val_loss']:.4f}"
    if values["val_answered"]:
        line += f", exact match {values['val_accuracy']:.1%} of {values['val_answered']}"
    return line
