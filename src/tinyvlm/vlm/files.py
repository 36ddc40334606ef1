"""A VLM's files: atomic ``save_pretrained``, ``push_to_hub`` and the model card.

A save is written to a temporary folder next to the target, then renamed into place, so an interrupted save
never leaves half a model. A save goes to a folder that does not exist or is empty; it replaces a folder that
already holds a saved model only when asked (``overwrite=True``, ``--overwrite``), and never one that holds
something else (`check_target`, called before any work).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch import Tensor, nn

from tinyvlm.errors import ConfigError, TinyVLMError
from tinyvlm.hub import HF_HUB, LOCAL_DIR, push_folder
from tinyvlm.registry import get_spec
from tinyvlm.vlm.config import PartRecord, VLMConfig

if TYPE_CHECKING:
    from tinyvlm.vlm.model import VLM


def save_vlm(vlm: "VLM", folder: Path, *, tensors: dict[str, Tensor] | None = None, overwrite: bool = False) -> Path:
    """``config.json``, ``model.safetensors`` (each tied tensor once) and the tokenizer files, atomically.
    ``tensors``: the weights to write when ``vlm`` holds only shards of them (a run sharded with FSDP passes
    the full state it gathered); by default the VLM's own. ``overwrite``: replace a saved model in ``folder``
    (`check_target`)."""
    if vlm.tokenizer is None:
        raise ConfigError("this VLM has no tokenizer to save; build it with build_vlm or load_vlm")
    if getattr(vlm, "peft_config", None):  # what peft leaves on a module it put adapters into (tinyvlm.interop.lora)
        raise ConfigError("this VLM carries a LoRA adapter: save the adapter alone (tinyvlm.interop.lora.save_adapter) "
                          "or merge it into the weights first (tinyvlm.interop.lora.merge_adapter, tinyvlm merge)")
    check_target(folder, overwrite=overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.saving-"))
    try:
        (staging / "config.json").write_text(vlm.config.to_json() + "\n")
        weights = unique_tensors(vlm) if tensors is None else {k: v.contiguous() for k, v in tensors.items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        vlm.tokenizer.save_pretrained(staging)
        swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def push_vlm(vlm: "VLM", repo_id: str, *, private: bool, token: str | None, commit_message: str) -> str:
    """Save to a temporary folder with a model card, upload it; returns the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_vlm(vlm, Path(tmp) / "model")
        (folder / "README.md").write_text(model_card(vlm.config, repo_id))
        return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


def check_target(folder: Path, *, overwrite: bool, holds: str = "config.json") -> None:
    """Refuse to save into ``folder`` unless it is new or empty, or ``overwrite`` is given and it holds what a
    save writes (``holds``: ``config.json`` for models, ``adapter_config.json`` for adapters), which the save
    then replaces as a whole. A folder holding anything else is never replaced. One-line `ConfigError`s."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file: choose a folder to save into")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not (folder / holds).is_file():
        raise ConfigError(f"{folder} is not empty and holds no {holds}, so it is not a saved model: choose another "
                          "folder (tinyvlm replaces only a folder it wrote, and only when asked)")
    if not overwrite:
        raise ConfigError(f"{folder} already holds a saved model: pass overwrite=True (--overwrite on the command "
                          "line) to replace it, files added to it included, or choose another folder")


def unique_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor (a tied LM head) stored once, under its first name."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def swap_into_place(staging: Path, folder: Path) -> None:
    """Rename the complete ``staging`` folder to ``folder``, moving an existing one aside until it succeeded."""
    if not folder.exists():
        staging.rename(folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    old.rmdir()
    folder.rename(old)
    try:
        staging.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_card(config: VLMConfig, repo_id: str) -> str:
    """A Hub model card (README.md) naming the components."""
    parts = config.parts
    projector = parts.projector.config if parts else config.projector_kwargs
    bases = [_hub_repo(config.encoder), _hub_repo(config.decoder)]
    front = ["---", "library_name: tinyvlm", "pipeline_tag: image-text-to-text", "tags:", "- tinyvlm", "- vision-language"]
    if any(bases):
        front += ["base_model:"] + [f"- {b}" for b in dict.fromkeys(bases) if b]
    front.append("---")
    rows = [
        f"| encoder | `{config.encoder}` | {_revision_of(parts.encoder if parts else None)} |",
        f"| projector | `{config.projector}` (factor {projector.get('factor')}, head {projector.get('head', '')}) | new |",
        f"| decoder | `{config.decoder}` | {_revision_of(parts.decoder if parts else None)} |",
    ]
    split = "on" if config.image_tokens.split_images else "off"
    return "\n".join(
        [
            *front,
            "",
            f"# {repo_id.split('/')[-1]}",
            "",
            "A vision-language model assembled with [tinyvlm](https://pypi.org/project/tinyvlm/).",
            "",
            "| part | name | revision |",
            "|---|---|---|",
            *rows,
            "",
            f"Image tokens: `{config.image_tokens.image_token}`, image splitting {split}.",
            "",
            "```python",
            "import tinyvlm",
            "",
            f'vlm = tinyvlm.load_vlm("hf-hub:{repo_id}")',
            'print(vlm.generate("Describe the image.", images=["photo.jpg"]))',
            "```",
            "",
        ]
    )


def _hub_repo(name: str) -> str | None:
    if name.startswith(HF_HUB):
        return name[len(HF_HUB) :].partition("@")[0]
    if name.startswith(LOCAL_DIR):
        return None
    try:
        return get_spec(name).hub_repo
    except TinyVLMError:
        return None


def _revision_of(record: PartRecord | None) -> str:
    return record.revision if record and record.revision else "-"
