"""Other projects' formats, as functions that take a model: export to transformers' layouts
(`tinyvlm.interop.transformers`), LoRA adapters in peft's format (`tinyvlm.interop.lora`, QLoRA layers in
`tinyvlm.interop.qlora`; what an adapter adapts: `tinyvlm.interop.lora_settings`, torch-free)."""
