"""``tinyvlm demo``: a VLM that learns to see on a laptop CPU in a few minutes, fully offline.

1. Draw a synthetic image-question dataset: one shape (circle / square / triangle) of one colour
   (red / green / blue / yellow) in one quadrant of a 64x64 picture, with questions about its colour, shape
   or position and one- or two-word answers.
2. Train a small byte-level BPE tokenizer on the questions and answers.
3. Build a tiny VLM from the ``test-siglip`` encoder and ``test-llama`` decoder zoo entries (random init,
   the decoder's vocabulary set to the tokenizer's) and train all of it with `tinyvlm.train`.
4. Print the held-out exact-match accuracy next to chance, and a few questions with the model's answers.

Chance is the best a model that cannot see can do: it can learn which answers go with which question, so it
scores 1/4 on colour and position questions and 1/3 on shape questions, 5/18 = 27.8 % over the mix.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyvlm.api import build_vlm, load_vlm
from tinyvlm.data import Record, read_records, split_records
from tinyvlm.data.answers import normalize_answer
from tinyvlm.errors import ConfigError
from tinyvlm.evaluation.shapes import ANSWERS, CHANCE, QUESTIONS, make_shapes_dataset
from tinyvlm.inference.threads import check_threads, fixed_threads
from tinyvlm.tokenizer import Tokenizer, train_tokenizer
from tinyvlm.training.checkpoints import checkpoint_dirs
from tinyvlm.training.loop import FINAL, train
from tinyvlm.vlm.model import VLM

# ------------------------------------------------------------------------------------------------ the run

#: Tuned on 2 CPU cores: learns well above chance in a few minutes (see docs/training.md for the figures).
IMAGES = 3000
STEPS = 1200
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
VOCAB_SIZE = 512  # enough merges for every answer word to be one token
VAL_FRACTION = 0.05
#: One thread: the figure is the same at any load (a 0.2M-parameter model gains little from more); it still
#: depends on the CPU's kernels (AVX2 or AVX-512 sum in other orders: docs/training.md, "The demo").
THREADS = 1


def question_kind(question: str) -> str:
    return next(kind for kind, phrasings in QUESTIONS.items() if any(p in question for p in phrasings))


def demo_tokenizer(records: list[Record]) -> Tokenizer:
    """A byte-level BPE tokenizer (ChatML special tokens, ids 0-2 as test-llama expects) trained on the
    records' chat transcripts, so that the template's text (its default system prompt) gets merges too."""
    texts = [m["content"] for r in records for m in r.messages]
    renderer = train_tokenizer(texts, VOCAB_SIZE)  # only to render transcripts with the ChatML template
    transcripts = [renderer.apply_chat_template(list(r.messages), add_generation_prompt=False) for r in records]
    return train_tokenizer(transcripts, VOCAB_SIZE)


def build_demo_vlm(tokenizer: Tokenizer, seed: int) -> VLM:
    """test-siglip + pixel shuffle 2 + MLP + test-llama with nanoVLM's image tokens, random init, with
    ``tokenizer`` and the decoder's vocabulary sized to it. (Not the one Linear of nanoVLM and SmolVLM, which the
    default pair and ``test-vlm`` have: the demo's figures, and those of the benchmarks that train it, are this
    model's.)"""
    torch.manual_seed(seed)
    base = build_vlm("test-siglip", "test-llama", "pixel-shuffle-mlp", pretrained=False, dtype=torch.float32,
                     projector_kwargs={"factor": 2}, decoder_kwargs={"vocab_size": len(tokenizer)},
                     processor_kwargs={"token_layout": "nanovlm"})
    # build_vlm joined test-llama's shipped tokenizer; swap in ours, with the image token added to it.
    (image_token_id,) = tokenizer.add_special_tokens([base.config.image_tokens.image_token])
    config = base.config.replace(parts=base.config.parts.replace(image_token_id=image_token_id))
    return VLM(config, base.encoder, base.projector, base.decoder, tokenizer)


@dataclass(frozen=True)
class DemoResult:
    accuracy: float
    chance: float
    per_kind: dict[str, float]
    seconds: float
    model_dir: Path


#: Where ``tinyvlm demo`` keeps its data, model and run when no ``--output`` is given (in the current folder).
DEFAULT_OUTPUT = "tinyvlm-demo"
#: The demo's own entries of its folder: what ``overwrite`` replaces (nothing else in the folder is touched).
SETTINGS, PARTS = "demo.json", ("data", "init", "run")


def run_demo(
    *, steps: int | None = None, seed: int = 0, output: str | Path = DEFAULT_OUTPUT, images: int = IMAGES,
    show: int = 6, progress: bool = True, overwrite: bool = False, threads: int = THREADS,
) -> DemoResult:
    """Draw the data, train, evaluate on the held-out images, print the figures and a few answers; everything
    stays in ``output`` (``data/``, ``init/`` the untrained model, ``run/`` the training run, ``demo.json``).

    An ``output`` that already holds a demo with the same settings is picked up where it stopped: its data is
    not drawn again, a finished run is only evaluated, an interrupted one resumes from its last checkpoint.
    One with other settings, or a folder that is not empty and holds no demo, is refused before any work,
    unless ``overwrite`` (which replaces the demo's own entries, nothing else).

    ``threads`` is fixed (not tuned per step as ``train`` does by default): another count sums the products in
    another order, which after the demo's steps is another model, and the demo's figure is published."""

    check_threads(threads)  # every option is checked before any work
    for option, value in (("steps", steps), ("images", images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{option} must be an integer >= 1 (the demo's default: leave it out); got {value!r}")
    folder = Path(output)
    settings = {"images": images, "steps": steps or STEPS, "seed": seed}
    marker = folder / SETTINGS
    if overwrite:
        marker.unlink(missing_ok=True)
        for name in PARTS:
            shutil.rmtree(folder / name, ignore_errors=True)
    elif marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != settings:
            changed = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in settings.items() if previous.get(k) != v)
            raise ConfigError(f"{folder} holds a demo run with other settings ({changed}): pass --overwrite to "
                              "start it again, or choose another --output")
    elif folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"{folder} is not empty and holds no demo run: choose another --output (or pass "
                          "--overwrite to write the demo's data/, init/ and run/ into it)")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings) + "\n")
    with fixed_threads(threads):
        return _run(folder, settings["steps"], seed, images, show, progress, threads)


def _run(folder: Path, steps: int, seed: int, count: int, show: int, progress: bool, threads: int) -> DemoResult:
    began = time.perf_counter()
    say = lambda text: print(text, flush=True)  # noqa: E731
    data = folder / "data" / "data.jsonl"  # written last: its presence means the drawing finished
    if data.is_file():
        records = read_records(data)
        say(f"using the {len(records)} images of shapes with questions drawn before in {data.parent}")
    else:
        data = make_shapes_dataset(folder / "data", count=count, seed=seed)
        records = read_records(data)
        say(f"drew {len(records)} images of shapes with questions in {data.parent}")
    if (folder / "init" / "model.safetensors").is_file():
        vlm = load_vlm(f"local-dir:{folder / 'init'}")
    else:
        vlm = build_demo_vlm(demo_tokenizer(records), seed)
        vlm.save_pretrained(folder / "init")
    params = sum(p.numel() for p in vlm.parameters()) / 1e6
    run = folder / "run"
    about = (f"a {params:.2f}M-parameter VLM (test-siglip + pixel-shuffle-mlp + test-llama, "
             f"{len(vlm.tokenizer)}-token BPE tokenizer)")
    if (run / FINAL / "model.safetensors").is_file():
        say(f"{about} trained for {steps} steps before in {run}: evaluating it (pass --overwrite to train again)")
        model_dir = run / FINAL
    else:
        resume = bool(checkpoint_dirs(run))
        if run.exists() and not resume:
            shutil.rmtree(run)  # stopped before its first checkpoint: nothing to resume
        say(f"built {about}; training all of it for {steps} steps on the CPU"
            + (" (resuming the interrupted run)" if resume else ""))
        model_dir = train(
            model=f"local-dir:{folder / 'init'}", data=data, output=run, train="all", max_steps=steps,
            batch_size=BATCH_SIZE, grad_accum=1, lr=LEARNING_RATE, warmup_steps=steps // 20, weight_decay=0.0,
            val_fraction=VAL_FRACTION, eval_samples=0, checkpoint_every=max(1, steps // 4), seed=seed, device="cpu",
            progress=progress, log_every=max(1, steps // 20), resume=resume, threads=threads,
        ).model_dir
    model = load_vlm(f"local-dir:{model_dir}")
    _, held_out = split_records(records, VAL_FRACTION, seed)  # the split train() used
    answers: list[str] = []
    for start in range(0, len(held_out), 64):
        group = held_out[start : start + 64]
        answers += model.generate([r.prompt for r in group], images=[list(r.images) for r in group], max_new_tokens=8)
    right = [normalize_answer(a) == normalize_answer(r.answer) for a, r in zip(answers, held_out)]
    kinds = [question_kind(r.prompt[-1]["content"]) for r in held_out]
    totals, hits = Counter(kinds), Counter(k for k, ok in zip(kinds, right) if ok)
    per_kind = {kind: hits[kind] / totals[kind] for kind in QUESTIONS if totals[kind]}
    accuracy = sum(right) / len(right)
    seconds = time.perf_counter() - began
    print(f"\nheld-out exact match: {accuracy:.1%} of {len(right)} questions (chance {CHANCE:.1%}); "
          + ", ".join(f"{kind} {value:.0%} (chance {1 / len(ANSWERS[kind]):.0%})" for kind, value in per_kind.items()))
    for record, answer, ok in list(zip(held_out, answers, right))[:show]:
        question = record.prompt[-1]["content"].replace("<image>", "")
        print(f"  {record.images[0].name}  {question:38} -> {answer!r:16} {'ok' if ok else 'expected ' + repr(record.answer)}")
    print(f"done in {seconds:.0f} s; the data, the run's metrics.jsonl and the model are in {folder} "
          f"(load the model with tinyvlm.load_vlm('local-dir:{model_dir}'))")
    return DemoResult(accuracy, CHANCE, per_kind, seconds, model_dir)
