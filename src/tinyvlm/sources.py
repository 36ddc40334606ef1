"""Names -> sources: the one place where a model name is parsed and resolved.

A name is a zoo key (``siglip-b16-224``), ``hf-hub:ORG/NAME[@REVISION]``, ``local-dir:PATH`` or a bare path
to a folder holding a ``config.json`` (``./runs/a/model``), or a training run's output folder (``./runs/a``,
meaning the final model it saved in ``model/``). `resolve` turns it into a `Source` without touching the
network; `adapter_folder` does the same for LoRA adapters (``./runs/lora`` means ``./runs/lora/adapter``). A Hub source is **pinned on first use**: its anchor file (``config.json``, or
``tokenizer.json`` for a tokenizer-only repo) is fetched at the requested revision (the zoo entry's pinned
commit, the ``@REVISION``, or ``main``), and every later file of that source (weights, tokenizer, generation
config, processor files) is fetched at the commit it resolved to, which is also what the VLM records as the
part's revision. So a model never mixes files of two commits, and a moving branch is asked once per build.

`download_model` and `is_cached` serve ``tinyvlm download`` and ``tinyvlm list-models``. This module is
torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyvlm.errors import HubError, UnknownModelError, WeightsError
from tinyvlm.hub import (
    HF_HUB,
    LOCAL_DIR,
    PICKLE_SUFFIXES,
    SHARD_INDEX,
    SINGLE_FILE,
    TOKENIZER_FILES,
    fetch,
)
from tinyvlm.registry import Kind, ModelSpec, family_for_config, get_family, get_spec, list_models

#: Tokenizers shipped with tinyvlm for the random-init ``test-*`` decoders.
ASSETS = Path(__file__).with_name("assets")
#: A training run's output folder (`tinyvlm.training`): its metrics log, which marks the folder as a run, and
#: what the run saves when it finishes: the model, or the adapter of a LoRA run.
RUN_METRICS = "metrics.jsonl"
RUN_MODEL = "model"
RUN_ADAPTER = "adapter"
#: The file that makes a folder a LoRA adapter (peft's layout).
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Source:
    """Where one model's files are: a Hub repo (pinned on first use), a local folder, or none (a random-init
    zoo entry or a VLM recipe, ``has_files`` False). ``name`` is how the user wrote it, for messages."""

    name: str
    spec: ModelSpec | None = None
    repo_id: str | None = None
    #: The revision asked for (None: ``main``); the commit it resolved to is `commit`.
    revision: str | None = None
    local_dir: Path | None = None
    #: The file fetched first, at the requested revision, to pin the repo.
    anchor: str = "config.json"
    _commit: str | None = field(default=None, init=False, repr=False)
    _json: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)

    @property
    def has_files(self) -> bool:
        return self.repo_id is not None or self.local_dir is not None

    @property
    def gated(self) -> bool:
        return bool(self.spec and self.spec.gated)

    @property
    def commit(self) -> str | None:
        """The Hub commit every file of this source comes from (fetching the anchor file the first time);
        None for local folders and file-less entries."""
        if self.repo_id is None:
            return None
        if self._commit is None:
            anchor = fetch(self.repo_id, self.anchor, self.revision, name=self.name, gated=self.gated)
            self._commit = anchor.parent.name  # snapshot folders are named after their commit
        return self._commit

    @property
    def folder(self) -> Path:
        """The folder holding the anchor file (a local folder, or the Hub snapshot of `commit`)."""
        path = self.file(self.anchor)
        assert path is not None
        return path.parent

    def file(self, filename: str, *, optional: bool = False) -> Path | None:
        """One file of the model (downloaded at `commit` if needed). A missing ``optional`` file is None."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            if path.is_file():
                return path
            if optional:
                return None
            raise HubError(f"{self.local_dir} has no {filename}")
        if self.repo_id is None:
            raise HubError(
                f"{self.name!r} has no files to load: it is a random-init zoo entry or a recipe "
                "(build it with pretrained=False, or with tinyvlm.build_vlm)"
            )
        commit = self.commit
        return fetch(self.repo_id, filename, commit, name=self.name, gated=self.gated, optional=optional)

    def json(self, filename: str, *, optional: bool = True) -> dict[str, Any]:
        """A JSON file of the model, parsed (``{}`` for a missing optional one); read once per source."""
        if filename not in self._json:
            path = self.file(filename, optional=optional)
            self._json[filename] = {} if path is None else read_json(path)
        return self._json[filename]

    def config_json(self) -> dict[str, Any]:
        return self.json("config.json", optional=False)

    def weight_files(self) -> list[Path]:
        """The safetensors files: ``model.safetensors``, or the shards of ``model.safetensors.index.json``."""
        single = self.file(SINGLE_FILE, optional=True)
        if single is not None:
            return [single]
        index = self.file(SHARD_INDEX, optional=True)
        if index is None:
            where = self.local_dir or f"{self.repo_id}@{self.commit}"
            pickles = sorted(p.name for p in self.local_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if self.local_dir else []
            found = f" It has {', '.join(pickles)}." if pickles else ""
            raise WeightsError(
                f"{where} has neither {SINGLE_FILE} nor {SHARD_INDEX}.{found} tinyvlm loads safetensors only "
                "(never pickle): convert the checkpoint to safetensors, or pick a repo that ships them."
            )
        files = []
        for shard in shard_names(index):
            path = self.file(shard)
            assert path is not None
            files.append(path)
        return files

    def tokenizer_folder(self) -> Path:
        """A folder with the tokenizer files (``tokenizer.json`` required, the others when present): this
        source's own, or the one shipped with tinyvlm for a random-init ``test-*`` decoder."""
        if not self.has_files:
            shipped = ASSETS / (self.spec.key if self.spec else "")
            if not (shipped / "tokenizer.json").is_file():
                raise HubError(f"{self.name!r} is a random-init entry with no tokenizer; use a decoder that has one")
            return shipped
        path = self.file(TOKENIZER_FILES[0])
        for filename in TOKENIZER_FILES[1:]:
            self.file(filename, optional=True)
        assert path is not None
        return path.parent


def resolve(name: str, kind: Kind | None = None) -> Source:
    """Parse one of the name forms (no network). A zoo key of another ``kind`` is an error that says what
    it is; an unknown name suggests the closest keys and the prefixes."""
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"a model name must be a non-empty string, got {name!r}")
    if name.startswith(HF_HUB):
        repo_id, at, revision = name[len(HF_HUB) :].partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")) or (at and not revision):
            raise HubError(f"{name!r}: write Hub repos as 'hf-hub:ORG/NAME' or 'hf-hub:ORG/NAME@REVISION'")
        return Source(name, repo_id=repo_id, revision=revision or None)
    if name.startswith(LOCAL_DIR):
        return _folder_source(name, Path(name[len(LOCAL_DIR) :]).expanduser())
    known = {spec.key for spec in list_models()}
    if name in known:
        spec = get_spec(name, kind=kind)
        return Source(name, spec=spec, repo_id=spec.hub_repo, revision=spec.revision)
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_source(name, path)
    get_spec(name, kind=kind)  # raises UnknownModelError with suggestions
    raise AssertionError("unreachable")


def tokenizer_source(name: str) -> Source:
    """A tokenizer named the way other projects' configs name one (nanoVLM's ``lm_tokenizer``): a Hub repo
    id ``ORG/NAME``, which may hold nothing but tokenizer files, or a local folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        return Source(name, local_dir=path, anchor="tokenizer.json")
    if name.count("/") != 1 or not all(name.split("/")):
        raise HubError(f"tokenizer {name!r} is neither a local folder nor a Hub repo id (ORG/NAME)")
    return Source(f"{HF_HUB}{name}", repo_id=name, anchor="tokenizer.json")


def _folder_source(name: str, folder: Path) -> Source:
    """A model folder, or a run folder's final model."""
    if (folder / "config.json").is_file():
        return Source(name, local_dir=folder)
    if is_run_folder(folder):
        if (folder / RUN_MODEL / "config.json").is_file():
            return Source(name, local_dir=folder / RUN_MODEL)
        if (folder / RUN_ADAPTER / ADAPTER_CONFIG).is_file():
            raise HubError(
                f"{name!r} is a LoRA run: its adapter ({folder / RUN_ADAPTER}) goes on the base it was trained on, "
                f"e.g. tinyvlm.load_vlm(BASE, adapter={str(folder)!r}) or tinyvlm merge BASE {folder} DIR"
            )
        raise HubError(
            f"{name!r} is a training run that has not saved its final model ({folder / RUN_MODEL}) yet: let it "
            "finish, or continue it with tinyvlm train ... --resume"
        )
    raise HubError(
        f"{name!r}: {folder} is not a model folder (it needs config.json and *.safetensors, as a Hub repo has)"
    )


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a training run's output (`RUN_METRICS` marks it)."""
    return (folder / RUN_METRICS).is_file()


def adapter_folder(path: str | Path) -> Path:
    """A LoRA adapter folder as given (``adapter_config.json`` in it), or the adapter a LoRA run saved when
    ``path`` is that run's output folder."""
    folder = Path(path).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file() and is_run_folder(folder) and (folder / RUN_ADAPTER / ADAPTER_CONFIG).is_file():
        return folder / RUN_ADAPTER
    return folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise HubError(f"{path} does not hold a JSON object")
    return value


def shard_names(index: Path) -> list[str]:
    """The shard files named by a ``model.safetensors.index.json``."""
    try:
        weight_map = read_json(index)["weight_map"]
        return sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError) as error:
        raise HubError(f"{index} is not a valid safetensors index ({error!r})") from None


# ------------------------------------------------------------------------------------- download / cache


def recipe_parts(spec: ModelSpec) -> tuple[str, ...]:
    """The encoder and decoder names of a VLM recipe (a ``vlm`` entry without weights of its own)."""
    if spec.kind != "vlm" or spec.has_weights:
        return ()
    return tuple(spec.config_json[part] for part in ("encoder", "decoder"))


def download_model(name: str) -> list[tuple[str, Path | None]]:
    """Fetch everything ``name`` needs to load offline later, by reading it as a load would (config, weights,
    tokenizer, a VLM layout's processor files and named tokenizer); for a VLM recipe, its encoder and
    decoder. Returns ``(name, folder)`` for each model, None when there is nothing to download."""
    source = resolve(name)
    if source.spec is not None and recipe_parts(source.spec):
        return [item for part in recipe_parts(source.spec) for item in download_model(part)]
    if source.repo_id is None:
        return [(name, None)]
    family = (
        get_family(source.spec.family)
        if source.spec is not None
        else family_for_config(source.config_json(), where=name)
    )
    if family.read is not None:  # a VLM layout: reads its own files (tokenizers, processor settings)
        family.read(source)
    elif family.kind == "decoder":
        source.tokenizer_folder()
    source.weight_files()
    return [(name, source.folder)]


def is_cached(spec: ModelSpec) -> bool | None:
    """Whether a zoo entry's config and weights (for a VLM recipe: its parts') are all in the local cache;
    None when the entry has nothing to download (random-init). No network."""
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
        source = resolve(name)
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
