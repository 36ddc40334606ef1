"""Names and files: the three name forms, and downloads from the Hugging Face Hub.

A name is a zoo key (``siglip-b16-224``), ``hf-hub:ORG/NAME[@REVISION]`` or ``local-dir:PATH``. Files come
from the Hub one by one with `huggingface_hub.hf_hub_download` (its cache, ``HF_HOME``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` all apply), every file of one model pinned to the commit its
``config.json`` resolved to. Hub failures become `HubError` messages that say what to do next.
This module is torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyvlm import __version__
from tinyvlm.errors import HubError
from tinyvlm.registry import Kind, ModelSpec, get_spec

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"

#: Files a tokenizer may come with; only ``tokenizer.json`` is required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
OPTIONAL_FILES = ("preprocessor_config.json",)


@dataclass(frozen=True)
class Source:
    """Where a name's config and weights come from: a zoo entry, a Hub repo or a local folder."""

    name: str
    spec: ModelSpec | None = None
    repo_id: str | None = None
    revision: str | None = None
    local_dir: Path | None = None

    @property
    def has_files(self) -> bool:
        return self.repo_id is not None or self.local_dir is not None


def parse_name(name: str, kind: Kind | None = None) -> Source:
    """Resolve one of the three name forms (no network)."""
    if name.startswith(HF_HUB):
        repo_id, _, revision = name[len(HF_HUB) :].partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HubError(f"{name!r}: write Hub repos as 'hf-hub:ORG/NAME' or 'hf-hub:ORG/NAME@REVISION'")
        return Source(name, repo_id=repo_id, revision=revision or None)
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR) :]).expanduser()
        if not (folder / "config.json").is_file():
            raise HubError(
                f"{name!r}: {folder} is not a model folder (it needs config.json and *.safetensors, "
                "as a Hub repo has)"
            )
        return Source(name, local_dir=folder)
    spec = get_spec(name, kind=kind)
    return Source(name, spec=spec, repo_id=spec.hub_repo, revision=spec.revision)


def model_folder(source: Source, *, weights: bool = True, tokenizer: bool = False) -> Path:
    """A folder holding the source's ``config.json`` (+ safetensors, + tokenizer files), downloading as needed."""
    if source.local_dir is not None:
        return source.local_dir
    if source.repo_id is None:
        raise HubError(f"{source.name!r} has no weights on the Hub: build it with pretrained=False")
    return download(source.repo_id, source.revision, weights=weights, tokenizer=tokenizer, gated=_gated(source))


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise HubError(f"cannot read {path}: {error}") from None


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    weights: bool = True,
    tokenizer: bool = False,
    gated: bool = False,
) -> Path:
    """Fetch what a model needs from ``repo_id`` into the Hugging Face cache; returns its snapshot folder."""
    config = _fetch(repo_id, "config.json", revision, gated=gated)
    folder = config.parent
    commit = folder.name  # the snapshot folder is named after the commit: pin every other file to it
    if weights:
        if _fetch_optional(repo_id, "model.safetensors", commit) is None:
            index = _fetch_optional(repo_id, "model.safetensors.index.json", commit)
            if index is None:
                raise HubError(
                    f"{repo_id} has neither model.safetensors nor model.safetensors.index.json: "
                    "tinyvlm loads safetensors only (never pickle)."
                )
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                _fetch(repo_id, shard, commit, gated=gated)
    if tokenizer:
        _fetch(repo_id, "tokenizer.json", commit, gated=gated)
        for filename in TOKENIZER_FILES[1:]:
            _fetch_optional(repo_id, filename, commit)
    for filename in OPTIONAL_FILES:
        _fetch_optional(repo_id, filename, commit)
    return folder


def is_cached(spec: ModelSpec) -> bool:
    """Whether a zoo entry's config and weights are in the local cache (no network)."""
    if spec.hub_repo is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(spec.hub_repo, filename, revision=spec.revision), str)

    return cached("config.json") and (cached("model.safetensors") or cached("model.safetensors.index.json"))


def _gated(source: Source) -> bool:
    return bool(source.spec and source.spec.gated)


def _fetch(repo_id: str, filename: str, revision: str | None, *, gated: bool = False) -> Path:
    from huggingface_hub import errors, hf_hub_download

    where = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, library_name="tinyvlm", library_version=__version__
            )
        )
    except errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: request access at https://huggingface.co/{repo_id} (logged in), then set "
            "HF_TOKEN to a token of that account (or run `hf auth login`) and try again."
        ) from None
    except errors.RepositoryNotFoundError:
        hint = " It is gated: request access on its page, then set HF_TOKEN." if gated else ""
        raise HubError(
            f"{repo_id} was not found on the Hub (or is private). Check the name (`tinyvlm list-models`); "
            f"for a private repo set HF_TOKEN.{hint}"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: revision {revision!r} does not exist; check the branch, tag or commit.") from None
    except errors.EntryNotFoundError:
        raise HubError(f"{where} has no {filename}: it is not a model in the Hugging Face layout.") from None
    except errors.LocalEntryNotFoundError:
        raise HubError(
            f"{filename} of {where} is not in the local cache and the Hub cannot be reached "
            "(offline, HF_HUB_OFFLINE=1, or a network failure). Run `tinyvlm download <name>` while online, "
            "or use a local folder with 'local-dir:PATH'."
        ) from None
    except (errors.HfHubHTTPError, OSError) as error:
        raise HubError(f"downloading {filename} of {where} failed: {error}. Check your connection.") from None


def _fetch_optional(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """A file the repo may not have: ``None`` when the Hub says it does not exist (or, offline, when the
    cache holds no copy of it)."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, library_name="tinyvlm", library_version=__version__
            )
        )
    except (errors.EntryNotFoundError, errors.LocalEntryNotFoundError):
        return None
    except errors.HfHubHTTPError as error:
        raise HubError(f"downloading {filename} of {repo_id} failed: {error}") from None
