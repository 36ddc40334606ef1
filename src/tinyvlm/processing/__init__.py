"""From prompts and images to model inputs: `tinyvlm.processing.processor` (the `Processor`: chat template,
image tokens, batching), `tinyvlm.processing.image` (image loading and transforms) and
`tinyvlm.processing.splitting` (SmolVLM's image splitting into tiles and a global view)."""
