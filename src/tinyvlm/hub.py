"""Names and files: the three name forms, and downloads from the Hugging Face Hub.

A name is a zoo key (``siglip-b16-224``), ``hf-hub:ORG/NAME[@REVISION]`` or ``local-dir:PATH``. Files come
from the Hub one by one with `huggingface_hub.hf_hub_download` (its cache, ``HF_HOME``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` all apply; ``library_name="tinyvlm"``). ``config.json`` is fetched first
and every other file of the model is then fetched at the commit it resolved to, so config, weights and
tokenizer always come from one commit even while a branch moves. Once a model is cached at a pinned commit,
loading it again makes no request at all. Hub failures become `HubError` messages that say what to do next.
This module is torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyvlm import __version__
from tinyvlm.errors import HubError
from tinyvlm.registry import Kind, ModelSpec, get_spec

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

#: Files a tokenizer may come with; only ``tokenizer.json`` is required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: Files read when present, whatever is fetched: the image processor's settings and a decoder's stop ids.
OPTIONAL_FILES = ("preprocessor_config.json", "generation_config.json")

_COMMIT = re.compile(r"[0-9a-f]{40}")


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
        repo_id, at, revision = name[len(HF_HUB) :].partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")) or (at and not revision):
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
    return download(
        source.repo_id,
        source.revision,
        weights=weights,
        tokenizer=tokenizer,
        gated=bool(source.spec and source.spec.gated),
        name=source.name,
    )


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
    name: str | None = None,
) -> Path:
    """Fetch what a model needs from ``repo_id`` into the Hugging Face cache; returns its snapshot folder.

    ``name`` is how the user called the model (for messages); it defaults to ``hf-hub:REPO[@REVISION]``.
    """
    repo = _Repo(repo_id, revision, gated, name or f"{HF_HUB}{repo_id}{'@' + revision if revision else ''}")
    folder = repo.fetch("config.json").parent
    repo.revision = folder.name  # snapshot folders are named after the commit: pin every other file to it
    if weights:
        if repo.fetch(SINGLE_FILE, optional=True) is None:
            index = repo.fetch(SHARD_INDEX, optional=True)
            if index is None:
                raise HubError(
                    f"{repo.where} has neither {SINGLE_FILE} nor {SHARD_INDEX}: tinyvlm loads safetensors only "
                    "(never pickle). Convert the checkpoint to safetensors, or pick a repo that ships them."
                )
            for shard in shard_names(index):
                repo.fetch(shard)
    if tokenizer:
        repo.fetch(TOKENIZER_FILES[0])
        for filename in TOKENIZER_FILES[1:]:
            repo.fetch(filename, optional=True)
    for filename in OPTIONAL_FILES:
        repo.fetch(filename, optional=True)
    return folder


def shard_names(index: Path) -> list[str]:
    """The shard files named by a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise HubError(f"{index} is not a valid safetensors index ({error!r})") from None


def recipe_parts(spec: ModelSpec) -> tuple[str, ...]:
    """The encoder and decoder names of a VLM recipe (a ``vlm`` entry without weights of its own)."""
    if spec.kind != "vlm" or spec.has_weights:
        return ()
    return tuple(spec.config_json[part] for part in ("encoder", "decoder"))


def download_model(name: str) -> list[tuple[str, Path | None]]:
    """Fetch everything ``name`` needs to load offline later: config and weights, plus the tokenizer for
    decoders and VLMs; for a VLM recipe, its encoder and decoder. Returns ``(name, snapshot folder)`` for each
    model, the folder ``None`` when there is nothing to download (random-init entries, local folders)."""
    source = parse_name(name)
    if source.spec is not None and recipe_parts(source.spec):
        return [item for part in recipe_parts(source.spec) for item in download_model(part)]
    if source.repo_id is None:
        return [(name, None)]
    if source.spec is not None:
        kind = source.spec.kind
    else:  # hf-hub: the family, hence what to fetch, comes from config.json (refused early if unsupported)
        from tinyvlm.registry import family_for_model_type

        config = read_config(model_folder(source, weights=False))
        kind = family_for_model_type(str(config.get("model_type", ""))).kind
    return [(name, model_folder(source, weights=True, tokenizer=kind in ("decoder", "vlm")))]


def is_cached(spec: ModelSpec) -> bool | None:
    """Whether a zoo entry's config and weights (for a VLM recipe: its parts') are all in the local cache;
    ``None`` when the entry has nothing to download (random-init). No network."""
    if recipe_parts(spec):
        parts = [_name_is_cached(part) for part in recipe_parts(spec)]
        return None if all(part is None for part in parts) else all(part is not False for part in parts)
    if spec.hub_repo is None:
        return None
    return _repo_is_cached(spec.hub_repo, spec.revision)


def _name_is_cached(name: str) -> bool | None:
    if name.startswith(LOCAL_DIR):
        return None
    if name.startswith(HF_HUB):
        source = parse_name(name)
        return _repo_is_cached(source.repo_id or "", source.revision)
    return is_cached(get_spec(name))


def _repo_is_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        return False
    folder = Path(config).parent
    if (folder / SINGLE_FILE).is_file():
        return True
    index = folder / SHARD_INDEX
    try:
        return index.is_file() and all((folder / shard).is_file() for shard in shard_names(index))
    except HubError:
        return False


@dataclass
class _Repo:
    """One model's files on the Hub, fetched at one revision (a commit once ``config.json`` resolved it)."""

    repo_id: str
    revision: str | None
    gated: bool
    name: str

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def fetch(self, filename: str, *, optional: bool = False) -> Path | None:
        """Download ``filename`` (or find it in the cache). An ``optional`` file the repo does not have gives
        ``None``; a required one, or any other failure, raises `HubError`."""
        import httpx2  # huggingface_hub's HTTP client
        from huggingface_hub import _CACHED_NO_EXIST, errors, hf_hub_download, try_to_load_from_cache

        if optional and self.revision and _COMMIT.fullmatch(self.revision):
            # A commit never changes: when the cache already knows the file is absent, do not ask again.
            if try_to_load_from_cache(self.repo_id, filename, revision=self.revision) is _CACHED_NO_EXIST:
                return None
        try:
            return Path(
                hf_hub_download(
                    self.repo_id,
                    filename,
                    revision=self.revision,
                    library_name="tinyvlm",
                    library_version=__version__,
                )
            )
        except errors.GatedRepoError:  # before RepositoryNotFoundError, its base class
            raise HubError(
                f"{self.repo_id} is gated: request access at https://huggingface.co/{self.repo_id} (logged in), "
                "then set HF_TOKEN to a read token of that account (or run `hf auth login`) and try again."
            ) from None
        except errors.RepositoryNotFoundError:
            gated = " It is gated: request access on its page, then set HF_TOKEN." if self.gated else ""
            raise HubError(
                f"{self.repo_id} was not found on the Hub (or it is private). Check the name "
                f"(`tinyvlm list-models` shows the zoo); for a private repo set HF_TOKEN.{gated}"
            ) from None
        except errors.RevisionNotFoundError:
            raise HubError(
                f"{self.repo_id} has no revision {self.revision!r}: check the branch, tag or commit."
            ) from None
        except errors.RemoteEntryNotFoundError:
            if optional:
                return None
            raise HubError(
                f"{self.where} has no {filename}: it is not a model in the Hugging Face layout tinyvlm reads."
            ) from None
        except errors.LocalEntryNotFoundError:  # not cached, and the Hub was not asked or did not answer
            if optional and try_to_load_from_cache(self.repo_id, filename, revision=self.revision) is _CACHED_NO_EXIST:
                return None
            raise HubError(self._unreachable(filename)) from None
        except errors.HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            raise HubError(
                f"the Hub answered HTTP {status} for {filename} of {self.where}; try again later "
                f"(or run `tinyvlm download {self.name}` once it is back)."
            ) from None
        except (OSError, httpx2.TransportError) as error:  # failures huggingface_hub does not wrap (mid-download)
            raise HubError(
                f"downloading {filename} of {self.where} failed ({error}). Check your connection, then run "
                f"`tinyvlm download {self.name}` while online."
            ) from None

    def _unreachable(self, filename: str) -> str:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            why = "HF_HUB_OFFLINE=1 is set"
            todo = f"Run `tinyvlm download {self.name}` while online (without HF_HUB_OFFLINE)"
        else:
            why = f"the Hub at {constants.ENDPOINT} cannot be reached"
            todo = f"Check your connection and run `tinyvlm download {self.name}` while online"
        return (
            f"{filename} of {self.where} is not in the local cache and {why}. {todo}, "
            "or load a local folder with 'local-dir:PATH'."
        )
