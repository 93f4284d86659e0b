"""The two-stream, layer-by-layer calibration engine for every method of :mod:`common.methods`.

Calibration walks the blocks in order and keeps two streams of block inputs, each [samples, ...]:

* the full-precision stream ``X``: the model with neither weight nor activation quantization (for methods
  whose statistics include ``D``);
* the quantized stream ``X̃``: the model with every earlier block (and earlier groups of this block)
  already quantized.

Modules, from the entry point down:

* :mod:`~common.engine.model`: :func:`~common.engine.model.quantize_model`, the walk over the blocks;
* :mod:`~common.engine.block`: one block's loop (full-precision pass; per group: quantized pass, statistics,
  solve; final pass);
* :mod:`~common.engine.plan`: which outputs each pass records, replays or skips (a pure function);
* :mod:`~common.engine.wiring`: how a pass is hooked into the block's linears and submodules;
* :mod:`~common.engine.ranks`: the collectives under torchrun;
* :mod:`~common.engine.adapter`: what a model family supplies (:class:`~common.engine.adapter.ModelAdapter`);
* :mod:`~common.engine.settings`: the settings of a calibration and its report.

Protocols: each method declares whether activations are quantized in the quantized stream while it
calibrates (the paper's protocol: on for the asymmetric methods, off for GPTQ: weights first, activations
quantized afterwards); ``act_quant_during_calibration`` overrides this for every method.
"""
