"""The ``tinyvlm`` command line. Listing and info stay torch-free; the other commands import it on demand."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from tinyvlm import __version__
from tinyvlm.errors import TinyVLMError
from tinyvlm.registry import KINDS, ModelSpec, get_spec, list_models


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
    return parser


# ------------------------------------------------------------------------------------------------ listing


def _format_params(params: int | None) -> str:
    if params is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= size:
            return f"{params / size:.1f}{unit}"
    return str(params)


def _row(spec: ModelSpec, cached: bool) -> dict[str, object]:
    row = spec.to_json()
    row.pop("config_json")
    return {**row, "cached": cached}


def cmd_list_models(args: argparse.Namespace) -> int:
    from tinyvlm.hub import is_cached

    specs = list_models(args.pattern, kind=args.kind)
    rows = [_row(spec, is_cached(spec)) for spec in specs]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no models match {args.pattern!r}" + (f" of kind {args.kind}" if args.kind else ""), file=sys.stderr)
        return 1
    header = ("KEY", "KIND", "FAMILY", "PARAMS", "DIM", "HUB REPO", "LICENSE", "GATED", "CACHED")
    table = [header] + [
        (
            r["key"],
            r["kind"] + (" (trained)" if r["trained"] else ""),
            r["family"],
            _format_params(r["params"]),
            "-" if r["dim"] is None else str(r["dim"]),
            r["hub_repo"] or "- (random init)",
            r["license"],
            "yes" if r["gated"] else "no",
            "yes" if r["cached"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tinyvlm.hub import HF_HUB, LOCAL_DIR, is_cached, model_folder, parse_name, read_config

    if args.name.startswith((HF_HUB, LOCAL_DIR)):
        from tinyvlm.factory import resolve_config
        from tinyvlm.registry import get_family

        source = parse_name(args.name)
        model_type = read_config(model_folder(source, weights=False)).get("model_type", "")
        from tinyvlm.registry import family_for_model_type

        family, config = resolve_config(family_for_model_type(model_type).kind, source, {})
        info = {"name": args.name, "kind": get_family(family.name).kind, "family": family.name,
                "config": config.model_dump(mode="json")}
    else:
        spec = get_spec(args.name)
        info = {**_row(spec, is_cached(spec)), "config": spec.config_json}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        config = info.pop("config")
        for field, value in info.items():
            print(f"{field:12} {value}")
        print("config       " + json.dumps(config, indent=1).replace("\n", "\n             "))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from tinyvlm.hub import model_folder, parse_name

    for name in args.names:
        source = parse_name(name)
        if source.spec is not None and not source.spec.has_weights:
            print(f"{name}: random-init entry, nothing to download")
            continue
        tokenizer = source.spec is not None and source.spec.kind == "decoder"
        folder = model_folder(source, weights=True, tokenizer=tokenizer)
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
