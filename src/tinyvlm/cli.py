"""The ``tinyvlm`` command line. Listing and info stay torch-free; the other commands import it on demand."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from tinyvlm import __version__
from tinyvlm.errors import TinyVLMError
from tinyvlm.registry import KINDS, ModelSpec, list_models


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except TinyVLMError as error:
        print(f"tinyvlm {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinyvlm list-models | head`: the reader left, which is not an error
        sys.stdout = open(os.devnull, "w")
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyvlm", description="Small vision-language models in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"tinyvlm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list-models", help="list the zoo")
    listing.add_argument("pattern", nargs="?", help="fnmatch pattern on keys, e.g. 'dinov3-*'")
    listing.add_argument("--kind", choices=KINDS)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=cmd_list_models)

    info = commands.add_parser("info", help="show one zoo entry or checkpoint")
    info.add_argument("name", help="zoo key, hf-hub:ORG/NAME[@REV] or local-dir:PATH")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(handler=cmd_info)

    download = commands.add_parser("download", help="fetch checkpoints into the Hugging Face cache")
    download.add_argument("names", nargs="+", metavar="NAME")
    download.set_defaults(handler=cmd_download)

    add_generate_parser(commands)

    add_train_parser(commands)
    add_demo_parser(commands)
    return parser


# ------------------------------------------------------------------------------------------------ listing


def _format_params(params: int | None) -> str:
    if params is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= size:
            return f"{params / size:.1f}{unit}"
    return str(params)


def _row(spec: ModelSpec) -> dict[str, object]:
    """One zoo entry as ``--json`` prints it: the spec without its config, plus ``cached`` (true / false, or
    null when there is nothing to download)."""
    from tinyvlm.sources import is_cached

    row = spec.to_json()
    row.pop("config_json")
    return {**row, "cached": is_cached(spec)}


def _yes_no(value: object) -> str:
    return "-" if value is None else "yes" if value else "no"


def cmd_list_models(args: argparse.Namespace) -> int:
    rows = [_row(spec) for spec in list_models(args.pattern, kind=args.kind)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        matching = f" matching {args.pattern!r}" if args.pattern else ""
        print(f"no {args.kind or 'model'}s{matching} in the zoo (see `tinyvlm list-models`)", file=sys.stderr)
        return 0
    header = ("KEY", "KIND", "FAMILY", "PARAMS", "DIM", "HUB REPO", "LICENSE", "GATED", "CACHED")
    table = [header] + [
        (
            str(r["key"]),
            str(r["kind"]) + (" (trained)" if r["trained"] else ""),
            str(r["family"]),
            _format_params(r["params"]),  # type: ignore[arg-type]
            "-" if r["dim"] is None else str(r["dim"]),
            str(r["hub_repo"] or ("- (recipe)" if r["kind"] == "vlm" else "- (random init)")),
            str(r["license"]),
            _yes_no(r["gated"]),
            _yes_no(r["cached"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tinyvlm.sources import resolve

    source = resolve(args.name)
    if source.spec is not None:
        info = {**_row(source.spec), "config": source.spec.config_json}
    else:  # a checkpoint: described by the family that reads its config.json (weights not downloaded)
        info = describe_checkpoint(source)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    config = info.pop("config")
    width = max(len(field) for field in info) + 2
    for field, value in info.items():
        print(f"{field + ':':{width}}{_yes_no(value) if isinstance(value, bool) or value is None else value}")
    print("config:\n  " + json.dumps(config, indent=2).replace("\n", "\n  "))
    return 0


def describe_checkpoint(source) -> dict[str, object]:
    """An ``hf-hub:`` / ``local-dir:`` / folder checkpoint as ``info`` shows it: its family and config (as
    that family reads them: a VLM layout's full `VLMConfig`), parameters and width (measured on the meta
    device) and where its files are."""
    from tinyvlm.factory import part_config
    from tinyvlm.registry import family_for_config, measure

    family = family_for_config(source.config_json(), where=source.name)
    if family.read is not None:
        config, _ = family.read(source)
    else:
        _, config = part_config(family.kind, source, {})
    params, dim = measure(family, config)
    return {
        "name": source.name,
        "kind": family.kind,
        "family": family.name,
        "params": params,
        "dim": dim,
        "hub_repo": source.repo_id,
        "revision": source.commit,  # the commit config.json resolved to (None for a local folder)
        "folder": str(source.folder),
        "config": config.model_dump(mode="json"),
    }


def cmd_download(args: argparse.Namespace) -> int:
    from tinyvlm.sources import download_model

    for name in args.names:
        for model, folder in download_model(name):
            print(f"{model}: {folder}" if folder else f"{model}: nothing to download (random init or local folder)")
    return 0


# ---------------------------------------------------------------------------------------------- generation


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate", help="answer a prompt about images, streaming the answer",
        description="Answer a prompt about one or more images with a saved VLM (--model) or one assembled from "
        "an encoder and a decoder (the projector is then untrained: for trying the plumbing, not for answers).",
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved VLM folder, local-dir:PATH, hf-hub:ORG/NAME or a VLM recipe key")
    source.add_argument("--encoder", help="vision encoder name (with --decoder)")
    generate.add_argument("--decoder", help="language decoder name (with --encoder)")
    generate.add_argument("--projector", default=None, help="projector name (default pixel-shuffle-mlp)")
    generate.add_argument("--image", nargs="+", default=[], metavar="PATH", help="image file(s), in prompt order")
    generate.add_argument("--prompt", required=True, help="the question; <image> marks where each image goes")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    generate.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    generate.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from tinyvlm.devices import check_device, default_device
    from tinyvlm.errors import ConfigError
    from tinyvlm.vlm.building import build_vlm, open_vlm

    device = check_device(args.device) or default_device()
    if args.model:
        if args.decoder or args.projector:
            raise ConfigError("--model names a whole VLM: drop --decoder / --projector")
        vlm = open_vlm(args.model, device=device)
    else:
        if not args.decoder:
            raise ConfigError("--encoder needs --decoder (or use --model)")
        vlm = build_vlm(args.encoder, args.decoder, args.projector, device=device)
    vlm.prepare_for_inference()
    for piece in vlm.stream(
        args.prompt, args.image, max_new_tokens=args.max_new_tokens, temperature=args.temperature
    ):
        print(piece, end="", flush=True)
    print()
    return 0


# ------------------------------------------------------------------------------------------------ training

#: ``tinyvlm train`` flags: (flag, type or action, help). Each maps to the `tinyvlm.train` option of the same
#: name; a flag left out keeps that option's default (so the defaults live in one place, `TrainConfig`).
_TRAIN_FLAGS: tuple[tuple[str, object, str], ...] = (
    ("--model", str, "a VLM recipe (e.g. test-vlm) or saved VLM folder (local-dir:PATH) instead of the parts"),
    ("--encoder", str, "vision encoder name"),
    ("--decoder", str, "language decoder name"),
    ("--projector", str, "projector name (default pixel-shuffle-mlp)"),
    ("--data", str, "training data, JSONL (image paths relative to the file)"),
    ("--output", str, "folder for metrics.jsonl, checkpoints/ and the final model/"),
    ("--train", str, "parts to train: projector (default), all, or a list like projector,decoder"),
    ("--max-steps", int, "optimizer steps (default: one pass over the data)"),
    ("--batch-size", int, "samples per micro-batch and process (default: the model's, nanoVLM's 2)"),
    ("--grad-accum", int, "micro-batches per optimizer step (default: the model's, nanoVLM's 8)"),
    ("--lr", float, "learning rate of every trained part (default: the model's, nanoVLM's 5.12e-3 projector, "
     "5e-5 encoder and decoder)"),
    ("--lr-encoder", float, "encoder learning rate (overrides --lr)"),
    ("--lr-projector", float, "projector learning rate (overrides --lr)"),
    ("--lr-decoder", float, "decoder learning rate (overrides --lr)"),
    ("--weight-decay", float, "AdamW weight decay of matrices (default 0.01)"),
    ("--warmup-steps", int, "linear warm-up steps (default 5%% of the steps), then cosine"),
    ("--min-lr-ratio", float, "final learning rate as a fraction of the peak (default 0.1)"),
    ("--grad-clip", float, "clip the gradient norm, 0 for no clipping (default: the model's, 1.0)"),
    ("--precision", str, "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16"),
    ("--compile", "store_true", "torch.compile the model"),
    ("--pack", "store_true", "pack several samples per row (needs --max-length)"),
    ("--max-length", int, "longest sample / packed row in tokens (default: the model's, 4096, or the decoder's "
     "context if shorter)"),
    ("--val-data", str, "held-out JSONL (default: hold out --val-fraction of --data)"),
    ("--val-fraction", float, "fraction of --data held out (default 0.05)"),
    ("--eval-every", int, "evaluate every N steps (default: after the last step only)"),
    ("--eval-samples", int, "held-out records answered for exact-match accuracy (default 256)"),
    ("--max-new-tokens", int, "answer length limit when evaluating (default 32)"),
    ("--checkpoint-every", int, "checkpoint every N steps, 0 for never (default 500)"),
    ("--keep-checkpoints", int, "checkpoints kept (default 2)"),
    ("--log-every", int, "log metrics every N steps (default 10)"),
    ("--seed", int, "seed of initialisation, data order and split (default 0)"),
    ("--resume", "store_true", "continue the run in --output from its last checkpoint"),
    ("--device", str, "cpu, cuda, cuda:1... (default: cuda if available; torchrun: cuda:LOCAL_RANK)"),
    ("--workers", int, "data-loading worker processes (default 0)"),
)


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="fine-tune a VLM on JSONL conversations (also under torchrun)",
        description="Fine-tune a VLM. Run under `torchrun --nproc-per-node N` for data parallelism.",
    )
    for flag, kind, help_text in _TRAIN_FLAGS:
        if kind == "store_true":
            train.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            train.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    train.add_argument("--random-init", dest="pretrained", action="store_false", default=argparse.SUPPRESS,
                       help="do not load pretrained weights (random initialisation)")
    train.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                       help="no progress bar")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from tinyvlm.training.loop import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    train(**options)
    return 0


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="train a tiny VLM on synthetic shapes on the CPU (a few minutes, offline)",
        description="Draw a synthetic shapes dataset, train a tiny VLM on it on the CPU, and show what it learned.",
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's tuned value)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default 0)")
    demo.add_argument("--output", help="keep the dataset, metrics and model here (default: a temporary folder)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from tinyvlm.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, output=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
