"""Trained VLMs published by other projects, as registry families of the ``vlm`` kind that read their own
checkpoint layouts into tinyvlm's parts (`tinyvlm.registry.Family.read`):

* `tinyvlm.formats.smolvlm`: SmolVLM / SmolVLM2 (transformers' Idefics3 / SmolVLM checkpoints);
* `tinyvlm.formats.nanovlm`: nanoVLM checkpoints (its own flat config.json and key layout).

`tinyvlm.load_vlm` reaches them like any family: the one whose ``detect`` / ``hf_model_types`` recognises
the checkpoint's ``config.json`` reads it.
"""
