"""Trained VLMs published by other projects, loaded into tinyvlm's own parts.

* `tinyvlm.pretrained.smolvlm`: SmolVLM / SmolVLM2 (transformers' Idefics3 / SmolVLM checkpoints).
* `tinyvlm.pretrained.nanovlm`: nanoVLM checkpoints (its own flat config.json and key layout).

Load them with `tinyvlm.load_vlm` (zoo key, ``hf-hub:`` repo or ``local-dir:`` folder).
"""
