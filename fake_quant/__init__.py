"""QuaRot rotation + fake quantization + GPTQ/GPTAQ for Llama-family LLMs."""
