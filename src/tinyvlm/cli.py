"""The ``tinyvlm`` command line. Listing and info stay torch-free; the other commands import it on demand."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from tinyvlm import __version__
from tinyvlm.config import RuntimeOptions, describe_options
from tinyvlm.errors import ConfigError, TinyVLMError
from tinyvlm.inference.threads import set_threads
from tinyvlm.registry import KINDS, ModelSpec, family_for_config, list_models, measure
from tinyvlm.sources import download_model, is_cached, resolve


def main(argv: Sequence[str] | None = None) -> int:
    argv = [_dashed(arg) for arg in (sys.argv[1:] if argv is None else list(argv))]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command=command)
    commands = _subparsers(parser)
    if command in commands:
        check_flags(commands[command], argv[argv.index(command) + 1 :])
    elif command is not None:
        close = difflib.get_close_matches(command, list(commands), n=1)
        parser.error(f"unknown command {command}" + (f"; did you mean {close[0]}?" if close else ""))
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


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``tinyvlm train: error: ...``, exit status 2) instead of a usage
    dump. (Abbreviated flags never reach it: `check_flags` refuses ``--max-step``, it does not mean
    ``--max-steps``.)"""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _dashed(arg: str) -> str:
    """``--max_steps`` / ``--max_steps=3`` -> ``--max-steps`` / ``--max-steps=3``: every flag takes underscores."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value


def check_flags(parser: argparse.ArgumentParser, args: Sequence[str]) -> None:
    """Refuse the first flag ``parser`` does not know, in one line naming the closest one it knows."""
    known = [option for option in parser._option_string_actions if option.startswith("--")]
    for arg in args:
        if arg == "--":
            return
        name = arg.partition("=")[0]
        if arg.startswith("--") and name not in parser._option_string_actions:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            parser.error(f"unknown flag {name}" + (f"; did you mean {close[0]}?" if close else ""))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``tinyvlm`` parser. The flags of ``train`` and ``serve`` come from their configs' fields, and
    ``--quantize`` / ``--threads`` of ``generate`` and ``eval`` from `tinyvlm.config.RuntimeOptions`, which
    costs a pydantic import: they are added only when ``command`` is that command (``list-models`` stays fast)."""
    parser = Parser(prog="tinyvlm", description="Small vision-language models in plain PyTorch. Flags take dashes or "
                    "underscores (--max-new-tokens, --max_new_tokens).")
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

    add_generate_parser(commands, with_flags=command == "generate")
    add_eval_parser(commands, with_flags=command == "eval")

    add_train_parser(commands, with_flags=command == "train")
    add_merge_parser(commands)
    add_export_parser(commands)
    add_demo_parser(commands)
    add_plot_parser(commands)
    add_serve_parser(commands, with_flags=command == "serve")
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
    """An ``hf-hub:`` / ``local-dir:`` / folder checkpoint as ``info`` shows it: its family and config, read
    from ``config.json`` alone as transformers' AutoConfig does (a VLM layout's `VLMConfig` of the
    architecture: no tokenizer, processor files or weights needed), parameters and width (measured on the
    meta device) and where its files are."""
    from tinyvlm.api import part_config

    family = family_for_config(source.config_json(), where=source.name)
    if family.read_config is not None:
        config = family.read_config(source.config_json(), source.name)
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

    for name in args.names:
        for model, folder in download_model(name):
            print(f"{model}: {folder}" if folder else f"{model}: nothing to download (random init or local folder)")
    return 0


# ---------------------------------------------------------------------------------------------- generation


def add_generate_parser(commands: argparse._SubParsersAction, *, with_flags: bool) -> None:
    generate = commands.add_parser(
        "generate", help="answer a prompt about images, streaming the answer",
        description="Answer a prompt about one or more images with a saved VLM (--model) or one assembled from "
        "an encoder and a decoder (the projector is then untrained: for trying the plumbing, not for answers). "
        "The prompt is one user turn, formatted as training formats conversations (--raw: plain text to continue).",
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved VLM folder, local-dir:PATH, hf-hub:ORG/NAME or a VLM recipe key")
    source.add_argument("--encoder", help="vision encoder name (with --decoder)")
    generate.add_argument("--decoder", help="language decoder name (with --encoder)")
    generate.add_argument("--projector", default=None, help="projector name (default pixel-shuffle-linear: a pixel shuffle and one Linear)")
    generate.add_argument("--image", nargs="+", default=[], metavar="PATH", help="image file(s), in prompt order")
    generate.add_argument("--prompt", required=True, help="the question; <image> marks where each image goes")
    generate.add_argument("--raw", action="store_true",
                          help="take the prompt as plain text to continue: no chat template, no role prefixes")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    generate.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    generate.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of probability P")
    generate.add_argument("--repetition-penalty", type=float, default=None,
                          help="transformers' repetition penalty (> 1 discourages repeating tokens)")
    generate.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="end the answer before this text (repeatable)")
    generate.add_argument("--seed", type=int, default=None, help="seed of the sampling (same seed, same answer)")
    generate.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    generate.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_runtime_flags(generate, with_flags=with_flags)
    generate.set_defaults(handler=cmd_generate)


def add_runtime_flags(parser: argparse.ArgumentParser, *, with_flags: bool) -> None:
    """``--quantize`` and ``--threads``: the fields of `tinyvlm.config.RuntimeOptions`, for a command that runs
    a model (added when ``with_flags``: that command is the one running); `runtime_options` reads them."""
    if with_flags:

        add_config_flags(parser, RuntimeOptions)


def runtime_options(args: argparse.Namespace):
    """The `tinyvlm.config.RuntimeOptions` given on the command line, validated."""

    return validated(RuntimeOptions, given_options(args, RuntimeOptions))


#: ``tinyvlm generate`` flags that are `tinyvlm.generation.SamplingConfig` fields (same names, ``-`` for ``_``).
_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")


def cmd_generate(args: argparse.Namespace) -> int:
    from tinyvlm.devices import check_device, default_device, parse_dtype
    from tinyvlm.api import build_vlm, load_vlm

    check_sampling_flags({name: getattr(args, name) for name in _SAMPLING_FLAGS})  # before the model is loaded
    runtime = runtime_options(args)
    set_threads(runtime.threads)
    dtype = parse_dtype(args.dtype)
    device = check_device(args.device) or default_device()
    if args.model:
        if args.decoder or args.projector:
            raise ConfigError("--model names a whole VLM: drop --decoder / --projector")
        source = resolve(args.model, "vlm")  # once: trained files are loaded, a recipe built
        door = load_vlm if source.has_files else build_vlm
        vlm = door(source, dtype=dtype, device=device, quantize=runtime.quantize)
    else:
        if not args.decoder:
            raise ConfigError("--encoder needs --decoder (or use --model)")
        vlm = build_vlm(args.encoder, args.decoder, args.projector, dtype=dtype, device=device, quantize=runtime.quantize)
    pieces = vlm.stream(
        args.prompt, args.image, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed, raw=args.raw,
    )  # fmt: skip
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def check_sampling_flags(values: dict[str, object]) -> None:
    """Validate the sampling flags as `SamplingConfig` does; a `ConfigError` names the flags."""
    from tinyvlm.generation import SamplingConfig

    try:
        SamplingConfig(**values)
    except ConfigError as error:
        problems = str(error).removeprefix(f"invalid {SamplingConfig.__name__}: ").split("; ")
        for name in values:
            flag = "--" + name.replace("_", "-")
            problems = [flag + p[len(name) :] if p.startswith((name + ":", name + ".")) else p for p in problems]
        raise ConfigError("; ".join(problems)) from None


# ---------------------------------------------------------------------------------------------- evaluation


def add_eval_parser(commands: argparse._SubParsersAction, *, with_flags: bool) -> None:
    from tinyvlm.evaluation.tasks import TASKS  # torch-free

    evaluate = commands.add_parser(
        "eval", help="score a VLM on benchmarks (MMStar, VQAv2, ChartQA) or on your own records",
        description="Answer a task's questions with greedy decoding, in batches and in the data's order, and score "
        "them as lmms-eval 0.7.3 does. Tasks: " + ", ".join(f"{name} ({task.columns})" for name, task in TASKS.items())
        + ". Benchmark data needs the eval extra: pip install \"tinyvlm[eval]\".",
    )
    evaluate.add_argument("--model", required=True, help="saved VLM folder, local-dir:PATH, hf-hub:ORG/NAME or a zoo key")
    evaluate.add_argument("--task", required=True, metavar="TASK[,TASK]", help=f"one or more of {', '.join(TASKS)}")
    evaluate.add_argument("--data", metavar="SOURCE", help="the task's data instead of its Hub dataset, as training reads "
                          "sources: a parquet file or folder, a save_to_disk folder, hf-dataset:ORG/NAME[/CONFIG][@REV]; "
                          "for exact_match also JSONL / JSON records (one task only)")
    evaluate.add_argument("--split", help="the split to read (default: the task's, e.g. val for mmstar)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="the first N samples of each task")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="B", help="questions answered together (default 8)")
    evaluate.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length limit (default: the task's)")
    evaluate.add_argument("--output", metavar="FILE", help="write the results as JSON (atomically)")
    evaluate.add_argument("--log-samples", action="store_true",
                          help="add each sample's prompt, answer, reference and score to the results")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    add_runtime_flags(evaluate, with_flags=with_flags)
    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tinyvlm.evaluation.runner import evaluate

    runtime = runtime_options(args)
    results = evaluate(
        args.model, args.task, data=args.data, split=args.split, limit=args.limit, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, output=args.output, log_samples=args.log_samples,
        progress=args.progress, device=args.device, quantize=runtime.quantize, threads=runtime.threads,
    )
    for name, task in results["tasks"].items():
        print(f"{name}: {task['metric']} {task['score']:.4f} on {task['samples']} samples "
              f"({task['seconds']:.1f} s, {task['seconds_per_100_samples']:.1f} s per 100)")
        others = [f"{metric} {value:.4f}" for metric, value in task["metrics"].items() if metric != task["metric"]]
        if others:
            print("  " + " | ".join(others))
    if args.output:
        print(f"results written to {args.output}")
    return 0


# ------------------------------------------------------------------------------------------------ training

def add_train_parser(commands: argparse._SubParsersAction, *, with_flags: bool) -> None:
    train = commands.add_parser(
        "train", help="fine-tune a VLM on conversations: JSONL, parquet, Hugging Face datasets (also under torchrun)",
        description="Fine-tune a VLM. Every flag is an option of tinyvlm.train (TrainConfig), named as in "
        "transformers' TrainingArguments where the meaning is the same; older names are kept as aliases. --config "
        "FILE reads options from a JSON, TOML or YAML file (in sections, or flat names as the flags without dashes); "
        "flags override the file. Run under `torchrun --nproc-per-node N` for data parallelism. See docs/training.md.",
    )
    train.set_defaults(handler=cmd_train)
    if with_flags:
        from tinyvlm.training.config import FLAT_FIELDS, LORA_SHORTHAND

        train.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                           help="read options from a JSON, TOML or YAML file (flags override it)")
        for field in FLAT_FIELDS.values():
            add_flag(train, field.name, field.info, aliases=field.aliases, required_hint=", here or in --config")
            if field.name == "use_lora":
                train.add_argument(flag(LORA_SHORTHAND), dest=LORA_SHORTHAND, type=int, metavar="N",
                                   default=argparse.SUPPRESS, help="--use-lora --lora-rank N in one flag (the "
                                   "earlier form)")


def cmd_train(args: argparse.Namespace) -> int:
    from tinyvlm.training.config import FLAT_FIELDS, LORA_SHORTHAND, TrainConfig, combine, describe_problems, flatten
    from tinyvlm.training.loop import run

    from_file = flatten_file(args.config) if "config" in args else {}
    given = {name: getattr(args, name) for name in [*FLAT_FIELDS, LORA_SHORTHAND] if name in args}
    try:
        config = TrainConfig.from_flat(combine(from_file, flatten(given)))
    except TinyVLMError as error:
        problems = getattr(error, "problems", None)
        if not problems:
            raise
        raise type(error)("; ".join(describe_problems(problems, flag))) from None
    run(config)
    return 0


def flatten_file(path: str) -> dict[str, object]:
    """The options of a ``--config`` file (`read_config_file`) by their flat names, its problems named by it."""
    from tinyvlm.errors import ConfigError
    from tinyvlm.training.config import flatten

    try:
        return flatten(read_config_file(path))
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None


# ------------------------------------------------------------------------------------- config fields -> flags


def flag(name: str) -> str:
    """The command-line flag of an option: ``max_steps`` -> ``--max-steps`` (``--max_steps`` works too)."""
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, model: type) -> None:
    """One flag per field of the pydantic ``model`` (`add_flag`)."""
    for name, field in model.model_fields.items():
        add_flag(parser, name, field)


def add_flag(parser: argparse.ArgumentParser, name: str, field: Any, *, aliases: Sequence[str] = (),
             required_hint: str = "") -> None:
    """The flag of option ``name`` (and of its ``aliases``), its type, help and default from the pydantic
    ``field``: a boolean is ``--name`` / ``--no-name``; a ``Literal`` gives the choices; a list or tuple is a
    flag given once per element (``--data a --data b``). A flag left out keeps the field's default (it lives in
    one place: the config)."""
    import types
    import typing
    from pathlib import Path

    options = [flag(name), *(flag(alias) for alias in aliases)]
    description = (field.description or name.replace("_", " ")).replace("%", "%%")
    default = field.default
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[X] -> X
    if kind is bool:
        parser.add_argument(*options, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=f"{description} (default: {'yes' if default else 'no'})")
        return
    shown = "" if default in (None, []) or field.is_required() else f" (default: {_shown(default)})"
    repeated = typing.get_origin(kind) in (list, tuple)
    if repeated:
        kind = typing.get_args(kind)[0]
        shown += " (repeatable)"
    if typing.get_origin(kind) is typing.Literal:
        if repeated:  # a comma list of names, checked by the config (which names the valid ones)
            kind = str
        else:
            choices = [str(choice) for choice in typing.get_args(kind)]
            parser.add_argument(*options, dest=name, choices=choices, default=argparse.SUPPRESS, help=description + shown)
            return
    convert = {int: int, float: float, str: str, Path: str}.get(kind)
    if convert is None:
        raise TypeError(f"option {name}: no command-line form for {field.annotation}")
    metavar = {int: "N", float: "X"}.get(kind, name.upper())
    parser.add_argument(*options, dest=name, type=convert, metavar=metavar, default=argparse.SUPPRESS,
                        action="append" if repeated else "store",
                        help=description + shown + (f" (required{required_hint})" if field.is_required() else ""))


def _shown(default: object) -> str:
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def given_options(args: argparse.Namespace, model: type) -> dict[str, object]:
    """The fields of ``model`` given on the command line (flags not given are absent from ``args``)."""
    return {name: getattr(args, name) for name in model.model_fields if name in args}


def read_config_file(path: str) -> dict[str, object]:
    """The object of a JSON, TOML (``.toml``) or YAML (``.yaml`` / ``.yml``) file; keys with dashes are read
    with underscores (``max-steps``: ``max_steps``)."""
    from pathlib import Path


    file = Path(path)
    form = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(file.suffix, "JSON")
    try:
        text = file.read_text()
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        if form == "TOML":
            import tomllib

            values = tomllib.loads(text)
        elif form == "YAML":
            import yaml  # PyYAML, which huggingface_hub requires

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ValueError as error:  # json's and tomllib's errors
        raise ConfigError(f"--config {path}: not valid {form} ({error})") from None
    except Exception as error:  # yaml.YAMLError
        raise ConfigError(f"--config {path}: not valid {form} ({' '.join(str(error).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected an object of options, got {type(values).__name__}")
    return _underscored(values)


def _underscored(values: dict) -> dict[str, object]:
    return {str(key).replace("-", "_"): _underscored(value) if isinstance(value, dict) else value
            for key, value in values.items()}


def validated(model: type, options: dict[str, object]):
    """``model(**options)`` (an `Options` class), its `ConfigError` reworded to name the flags."""

    try:
        return model(**options)
    except ConfigError as error:
        problems = getattr(error, "problems", None)
        if not problems:
            raise
        raise ConfigError("; ".join(describe_options(model, problems, flag))) from None


# ------------------------------------------------------------------------------------------- LoRA, export


def add_merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge", help="fold a LoRA adapter into its base VLM and save a plain model",
        description="Load BASE (a saved or trained VLM, or the recipe the adapter was trained on), apply the LoRA "
        "adapter in ADAPTER (tinyvlm train --lora, or peft's save_pretrained), fold W + (alpha/r) B A into the "
        "weights and save the plain model to DIR (tinyvlm's layout; tinyvlm export converts it).",
    )
    merge.add_argument("base", metavar="BASE", help="the base VLM the adapter was trained on")
    merge.add_argument("adapter", metavar="ADAPTER", help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("output", metavar="DIR", help="where the merged model goes")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype of the merge and of the saved weights (default: float32)")
    merge.add_argument("--overwrite", action="store_true", help="replace a model already saved in DIR (files "
                       "added to it included; a folder holding anything else is never replaced)")
    merge.set_defaults(handler=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from tinyvlm.api import load_vlm
    from tinyvlm.interop.lora import merge_adapter
    from tinyvlm.vlm.files import check_target

    check_target(Path(args.output), overwrite=args.overwrite)  # before the model is loaded
    vlm = load_vlm(args.base, adapter=args.adapter, dtype=args.dtype)
    folder = merge_adapter(vlm).save_pretrained(args.output, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base}: {folder} (load it with tinyvlm.load_vlm({str(folder)!r}))")
    return 0


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write a VLM or a decoder in transformers' layout (Idefics3 / LlamaForCausalLM / ...)",
        description="Write NAME in transformers' layout into DIR: a VLM as Idefics3ForConditionalGeneration + "
        "Idefics3Processor files (SigLIP + Llama + pixel-shuffle-linear with the smolvlm token layout, e.g. any "
        "SmolVLM), a decoder as LlamaForCausalLM / Gemma3ForCausalLM. transformers and vLLM load the folder.",
    )
    export.add_argument("name", metavar="NAME", help="a saved or trained VLM, a VLM recipe, or a decoder")
    export.add_argument("output", metavar="DIR", help="the folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace a model already saved in DIR (files "
                        "added to it included; a folder holding anything else is never replaced)")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tinyvlm.api import build_decoder, build_vlm, load_vlm
    from tinyvlm.tokenizer import Tokenizer
    from tinyvlm.vlm.files import check_target

    check_target(Path(args.output), overwrite=args.overwrite)  # before the model is read
    source = resolve(args.name)  # once: a VLM (saved, trained, or a recipe) or a decoder
    if source.spec is not None:
        kind = source.spec.kind
    else:
        kind = family_for_config(source.config_json(), where=source.name).kind
    if kind == "vlm":
        vlm = load_vlm(source) if source.has_files else build_vlm(source)
        folder = vlm.save_pretrained(args.output, layout="transformers", overwrite=args.overwrite)
    elif kind == "decoder":
        tokenizer = Tokenizer.from_folder(source.tokenizer_folder())
        folder = build_decoder(source).save_pretrained(args.output, layout="transformers", tokenizer=tokenizer,
                                                        overwrite=args.overwrite)
    else:
        raise ConfigError(f"{args.name!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}: export writes VLMs "
                          "(Idefics3) and decoders (LlamaForCausalLM / Gemma3ForCausalLM)")
    layout = "Idefics3" if kind == "vlm" else "causal LM"
    print(f"exported the {kind} {args.name} to {folder} (transformers {layout} layout)")
    return 0


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="train a tiny VLM on synthetic shapes on the CPU (a few minutes, offline)",
        description="Draw a synthetic shapes dataset, train a tiny VLM on it on the CPU, and show what it learned.",
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's tuned value)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default 0)")
    demo.add_argument("--output", default=None, help="folder of the data, the run and the model; a demo folder "
                      "with the same settings is picked up where it stopped (default: ./tinyvlm-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace the demo in --output (its data, init "
                      "and run) instead of refusing other settings or a folder that holds something else")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads, fixed for the whole run "
                      "(default 1: the published figures, the same at any load on one machine; another count is another model)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from tinyvlm.demo import DEFAULT_OUTPUT, THREADS, run_demo

    run_demo(steps=args.steps, seed=args.seed, output=args.output or DEFAULT_OUTPUT, overwrite=args.overwrite,
             threads=THREADS if args.threads is None else args.threads)
    return 0


def add_plot_parser(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot", help="draw a training run's loss and accuracy curves (needs tinyvlm[plot])",
        description="Write metrics.png (training and held-out loss, held-out exact match against the step) next "
        "to a run's metrics.jsonl. Runs draw it themselves at the end; this redraws it, e.g. during a run.",
    )
    plot.add_argument("run", help="a training output folder, or its metrics.jsonl")
    plot.set_defaults(handler=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from tinyvlm.training.plot import plot_run

    print(f"wrote {plot_run(args.run)}")
    return 0


# -------------------------------------------------------------------------------------------------- serving


def add_serve_parser(commands: argparse._SubParsersAction, *, with_flags: bool) -> None:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible chat-completions server (needs tinyvlm[serve])",
        description="Serve a VLM over OpenAI's chat-completions API (GET /v1/models, POST /v1/chat/completions, "
        "streaming, images as data: or http(s) URLs), batching concurrent requests. Any OpenAI client connects "
        "with base_url http://HOST:PORT/v1. See docs/serving.md.",
    )
    serve.set_defaults(handler=cmd_serve)
    if with_flags:  # pydantic is imported only for this command (list-models stays fast)
        from tinyvlm.serve.config import ServeConfig

        source = serve.add_mutually_exclusive_group(required=True)
        source.add_argument("--model", help="saved VLM folder, local-dir:PATH, hf-hub:ORG/NAME or a VLM recipe key; "
                            "clients ask for the model by this name")
        source.add_argument("--encoder", help="vision encoder name (with --decoder; the projector is untrained)")
        serve.add_argument("--decoder", help="language decoder name (with --encoder)")
        serve.add_argument("--projector", default=None, help="projector name (default pixel-shuffle-linear: a pixel shuffle and one Linear)")
        serve.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
        add_config_flags(serve, ServeConfig)


def cmd_serve(args: argparse.Namespace) -> int:
    from tinyvlm.serve import require_server_stack

    require_server_stack()  # before the model is loaded
    from tinyvlm.devices import check_device, default_device
    from tinyvlm.serve.app import run
    from tinyvlm.serve.config import ServeConfig
    from tinyvlm.api import build_vlm, load_vlm

    config = validated(ServeConfig, given_options(args, ServeConfig))
    set_threads(config.threads)
    device = check_device(args.device) or default_device()
    if args.model:
        if args.decoder or args.projector:
            raise ConfigError("--model names a whole VLM: drop --decoder / --projector")
        source = resolve(args.model, "vlm")  # once: trained files are loaded, a recipe built
        door = load_vlm if source.has_files else build_vlm
        name, vlm = args.model, door(source, device=device, quantize=config.quantize)
    else:
        if not args.decoder:
            raise ConfigError("--encoder needs --decoder (or use --model)")
        name = f"{args.encoder}+{args.decoder}"
        vlm = build_vlm(args.encoder, args.decoder, args.projector, device=device, quantize=config.quantize)
    run(vlm, name, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
