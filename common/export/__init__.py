"""Deployable checkpoints of the quantized weights: the ``gptq``, ``gptq_v2`` and ``compressed-tensors``
formats that GPTQModel, transformers, vLLM and llm-compressor load (:mod:`common.export.formats`)."""
