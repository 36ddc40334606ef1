"""A VLM's files: atomic ``save_pretrained``, ``push_to_hub`` and the model card.

A save is written to a temporary folder next to the target, then renamed into place; an existing model
folder is replaced only once the new one is complete, so an interrupted save never loses the old model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch import Tensor, nn

from tinyvlm.errors import ConfigError, TinyVLMError
from tinyvlm.hub import HF_HUB, LOCAL_DIR, push_folder
from tinyvlm.registry import get_spec
from tinyvlm.vlm.config import MODEL_TYPE, PartRecord, VLMConfig

if TYPE_CHECKING:
    from tinyvlm.vlm.model import VLM


def save_vlm(vlm: "VLM", folder: Path, *, tensors: dict[str, Tensor] | None = None) -> Path:
    """``config.json``, ``model.safetensors`` (each tied tensor once) and the tokenizer files, atomically.
    ``tensors``: the weights to write when ``vlm`` holds only shards of them (a run sharded with FSDP passes
    the full state it gathered); by default the VLM's own."""
    if vlm.tokenizer is None:
        raise ConfigError("this VLM has no tokenizer to save; build it with build_vlm or load_vlm")
    if getattr(vlm, "peft_config", None):  # what peft leaves on a module it put adapters into (tinyvlm.interop.lora)
        raise ConfigError("this VLM carries a LoRA adapter: save the adapter alone (tinyvlm.interop.lora.save_adapter) "
                          "or merge it into the weights first (tinyvlm.interop.lora.merge_adapter, tinyvlm merge)")
    if folder.exists() and any(folder.iterdir()) and not is_model_folder(folder):
        raise ConfigError(f"{folder} exists and is not a tinyvlm model folder; refusing to replace it")
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


def is_model_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


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
