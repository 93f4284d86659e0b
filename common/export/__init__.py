"""Deployable checkpoints of the quantized weights (the ``gptq`` format that GPTQModel, transformers and vLLM load)."""
