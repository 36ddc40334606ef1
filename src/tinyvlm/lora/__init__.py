"""LoRA fine-tuning through peft: `settings` (torch-free: rank, targets, parts) and `adapter` (inject, save,
load and merge adapters in peft's own file format). See docs/finetuning.md."""
