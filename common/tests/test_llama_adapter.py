"""The Llama adapter's declarations hold for the Hugging Face model: groups, tails, and the engine with them."""

from __future__ import annotations

import copy

import torch

from common.engine.adapter import find_tails
from common.engine.model import quantize_model
from common.engine.settings import CalibrationSettings
from common.llama.adapter import TAILS, LlamaAdapter, add_activation_quantizers
from common.quant.qlinear import QuantLinear
from common.solvers.column_loop import SolverConfig
from common.tests.llama_fixtures import tiny_llama


def _quantized_tiny_llama():
    model = tiny_llama()
    add_activation_quantizers(model, bits=4, sym=False, clip_ratio=0.9, groupsize=-1)
    return model


def test_declared_tails_are_what_the_block_returns():
    model = _quantized_tiny_llama()
    tokens = torch.randint(0, 256, (2, 12))
    assert find_tails(model.model.layers[0], lambda: model(tokens)) == TAILS


def test_calibration_with_tails_equals_running_every_submodule():
    model = _quantized_tiny_llama()
    batches = [torch.randint(0, 256, (3, 16)) for _ in range(2)]
    weights = []
    for reuse in (True, False):
        copy_ = copy.deepcopy(model)
        settings = CalibrationSettings(method="gptaq", solver=SolverConfig(bits=4), batch_size=3,
                                       reuse_outputs=reuse)
        quantize_model(copy_, LlamaAdapter(), settings, batches, progress=False)
        weights.append([m.weight for m in copy_.modules() if isinstance(m, QuantLinear)])
    assert len(weights[0]) == 14
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
