"""What makes inference fast, kept out of the model forwards: weight-only quantization
(`tinyvlm.inference.quantize`) and the choice of intra-op threads (`tinyvlm.inference.threads`)."""
