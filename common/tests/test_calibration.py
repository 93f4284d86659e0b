"""The two-stream calibration engine on a toy model, against a naive whole-model reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from common.engine.adapter import Tail, find_tails
from common.engine.model import quantize_model
from common.engine.settings import CalibrationSettings
from common.methods import METHODS
from common.quant.qlinear import QuantLinear, wrap_linears
from common.quant.quantizers import ActivationQuantizer, rtn_quantize_weight
from common.solvers.column_loop import SolverConfig
from common.solvers.statistics import CalibrationStatistics

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels

GROUPS = [["fc1", "gate"], ["fc2"]]


class ToyBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, *, scale: float) -> torch.Tensor:
        h = self.norm(x)
        return x + scale * self.fc2(torch.relu(self.fc1(h)) * torch.sigmoid(self.gate(h)))


class ToyModel(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 24, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(ToyBlock(width, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, scale=0.5)
        return h


class ToyAdapter:
    def blocks(self, model):
        return model.blocks

    def linear_groups(self, block):
        return [list(group) for group in GROUPS]

    def run_prologue(self, model, batch, device):
        model(batch.to(device))

    def run_block(self, block, hidden, kwargs):
        return block(hidden, **kwargs)

    def tail_linears(self, block):
        return {}


def _toy(seed: int = 0, act_bits: int = 4) -> tuple[ToyModel, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = ToyModel().double()
    for block in model.blocks:
        for linear in wrap_linears(block, ["fc1", "gate", "fc2"]).values():
            linear.act_quantizer = ActivationQuantizer(act_bits, clip_ratio=0.9)
    data = [torch.randn(4, 10, 8, dtype=torch.float64) for _ in range(3)]
    return model, data


def _settings(method: str, **overrides) -> CalibrationSettings:
    solver = SolverConfig(bits=3, blocksize=8)
    return CalibrationSettings(method=method, solver=solver, stats_dtype=torch.float64, **overrides)


def _naive_reference(model: ToyModel, data: list[torch.Tensor],
                     settings: CalibrationSettings) -> tuple[ToyModel, list[float]]:
    """Whole-model passes for every group: no streams, no caching, no early stops; also the relative output
    error of every linear computed from its inputs (the method's objective)."""
    reference = copy.deepcopy(model)
    full_precision = copy.deepcopy(model)
    for module in full_precision.modules():
        if isinstance(module, QuantLinear):
            module.quantize_input = False
    for module in reference.modules():
        if isinstance(module, QuantLinear):
            module.quantize_input = settings.quantize_activations
    inputs = torch.cat(data)
    errors: list[float] = []
    for index, block in enumerate(reference.blocks):
        for group in GROUPS:
            captured: dict[tuple[str, str], torch.Tensor] = {}
            for tag, net in (("quant", reference), ("full", full_precision)):
                for name in group:
                    linear = net.blocks[index].get_submodule(name)
                    linear.observer = lambda x, key=(tag, name), sink=captured: sink.setdefault(key, x)
                with torch.no_grad():
                    net(inputs)
                for name in group:
                    net.blocks[index].get_submodule(name).observer = None
            for name in group:
                linear = block.get_submodule(name)
                stats = CalibrationStatistics(linear.in_features, asymmetric=True, dtype=torch.float64)
                stats.add(captured[("quant", name)], captured[("full", name)])
                spec = METHODS[settings.method]
                drift = stats.drift() if spec.needs_full_precision_stream else None
                solved = spec.solve(linear.weight, stats.hessian(), drift, settings.solver_for(name)).weight
                x_quant = captured[("quant", name)].reshape(-1, linear.in_features)
                x_full = captured[("full", name)].reshape(-1, linear.in_features)
                original = linear.weight.detach()
                if spec.needs_full_precision_stream:
                    reference_output = x_full @ original.T
                    error = (x_quant @ solved.T - reference_output).square().sum() / reference_output.square().sum()
                else:
                    error = (x_quant @ (solved - original).T).square().sum() / (x_quant @ original.T).square().sum()
                errors.append(float(error))
                with torch.no_grad():
                    linear.weight.copy_(solved)
    return reference, errors


def _weights(model: ToyModel) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, QuantLinear)]


CALIBRATED = [name for name, method in METHODS.items() if method.calibrated]


@pytest.mark.parametrize("reuse_outputs", [True, False])
@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize("act_quant", [None, True, False])
def test_engine_matches_naive_reference(method, act_quant, reuse_outputs):
    model, data = _toy()
    settings = _settings(method, act_quant_during_calibration=act_quant, batch_size=5, reuse_outputs=reuse_outputs)
    expected, errors = _naive_reference(model, data, settings)
    report = quantize_model(model, ToyAdapter(), settings, data, progress=False)
    for got, want in zip(_weights(model), _weights(expected), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert [r.output_error for r in report.layers] == pytest.approx(errors, rel=1e-8)
    assert [(r.block, r.name) for r in report.layers] == [(b, n) for b in range(3) for n in ("fc1", "gate", "fc2")]
    assert all(r.output_error >= 0 and r.loss >= 0 for r in report.layers)


def test_batch_size_does_not_change_the_result():
    results = []
    for batch_size in (1, 4, 12):
        model, data = _toy()
        quantize_model(model, ToyAdapter(), _settings("gptaq", batch_size=batch_size), data, progress=False)
        results.append(_weights(model))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gptaq_without_drift_correction_is_gptq():
    """alpha = 0 removes GPTAQ's correction: with the same protocol the engine must give GPTQ exactly."""
    model_q, data = _toy()
    model_aq = copy.deepcopy(model_q)
    quantize_model(model_q, ToyAdapter(), _settings("gptq", act_quant_during_calibration=True), data,
                   progress=False)
    solver = SolverConfig.of(bits=3, blocksize=8, alpha=0.0)
    settings = CalibrationSettings(method="gptaq", solver=solver, stats_dtype=torch.float64,
                                   act_quant_during_calibration=True)
    quantize_model(model_aq, ToyAdapter(), settings, data, progress=False)
    for got, want in zip(_weights(model_aq), _weights(model_q), strict=True):
        assert torch.equal(got, want)


def test_qep_with_every_linear_excluded_is_gptq():
    """QEP's exclusion list turns its correction off per linear: all excluded, QEP is GPTQ (same protocol)."""
    model_q, data = _toy()
    model_qep = copy.deepcopy(model_q)
    quantize_model(model_q, ToyAdapter(), _settings("gptq", act_quant_during_calibration=True), data,
                   progress=False)
    excluded = {name: SolverConfig.of(bits=3, blocksize=8, qep_alpha=0.0) for name in ("fc1", "gate", "fc2")}
    quantize_model(model_qep, ToyAdapter(), _settings("qep", linear_solvers=excluded), data, progress=False)
    for got, want in zip(_weights(model_qep), _weights(model_q), strict=True):
        assert torch.equal(got, want)
    partly = copy.deepcopy(model_qep)
    quantize_model(partly, ToyAdapter(), _settings("qep", linear_solvers={"fc2": excluded["fc2"]}), data,
                   progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(partly), _weights(model_q), strict=True))


def test_rtn_rounds_every_linear():
    model, _ = _toy()
    originals = [w.clone() for w in _weights(model)]
    report = quantize_model(model, ToyAdapter(), _settings("rtn"), progress=False)
    for got, original in zip(_weights(model), originals, strict=True):
        assert torch.equal(got, rtn_quantize_weight(original, bits=3))
    assert len(report.layers) == 9


def test_input_quantization_is_restored_for_evaluation():
    model, data = _toy()
    quantize_model(model, ToyAdapter(), _settings("gptq"), data, progress=False)
    assert all(m.quantize_input and m.observer is None for m in model.modules() if isinstance(m, QuantLinear))


def test_errors():
    model, data = _toy()
    with pytest.raises(ValueError, match=r"method must be one of \('fp', 'rtn', 'gptq'"):
        CalibrationSettings(method="awq", solver=SolverConfig(bits=4))
    with pytest.raises(ValueError, match="method must be a quantizing method"):
        CalibrationSettings(method="fp", solver=SolverConfig(bits=4))
    with pytest.raises(ValueError, match="calibration_batches must not be empty"):
        quantize_model(model, ToyAdapter(), _settings("gptaq"), [], progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _settings("gptq", batch_size=0)
    plain = ToyModel().double()
    with pytest.raises(TypeError, match=r"fc1 must be a QuantLinear \(common\.quant\.qlinear\)"):
        quantize_model(plain, ToyAdapter(), _settings("gptq"), data, progress=False)


@pytest.mark.parametrize("with_bias", [False, True])
def test_squared_norm_by_slices_equals_the_whole_float64_sum(with_bias):
    from common.engine.block import _squared_norm

    generator = torch.Generator().manual_seed(3)
    output = torch.randn(3, 1000, 7, generator=generator)  # 3000 rows: several slices, the last one short
    bias = torch.randn(7, generator=generator) if with_bias else None
    reference = (output.double() - (0 if bias is None else bias.double())).square().sum()
    assert _squared_norm(output, bias) == pytest.approx(float(reference), rel=1e-13)


def test_squared_norm_leaves_a_float64_output_alone():
    from common.engine.block import _squared_norm

    output = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    assert _squared_norm(output, None) == 55.0
    assert torch.equal(output, torch.arange(6, dtype=torch.float64).reshape(2, 3))


def test_parameters_outside_the_blocks_wait_in_a_file_and_come_back(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTAQ_CACHE_DIR", str(tmp_path))
    model, data = _toy()
    embedding = {name: p.detach().clone() for name, p in model.embed.named_parameters()}
    sizes_while_calibrating = []
    adapter = ToyAdapter()
    run_block = adapter.run_block

    def watching(block, hidden, kwargs):
        sizes_while_calibrating.append(model.embed.weight.numel())
        return run_block(block, hidden, kwargs)

    adapter.run_block = watching
    quantize_model(model, adapter, _settings("gptaq"), data, progress=False)
    assert sizes_while_calibrating and set(sizes_while_calibrating) == {0}
    for name, parameter in model.embed.named_parameters():
        assert torch.equal(parameter, embedding[name]), name


def test_a_parameter_sharing_memory_with_a_block_is_not_parked():
    from common.engine.model import _outside_blocks

    model, _ = _toy()
    alias = nn.Parameter(model.blocks[0].fc1.weight.data[:4])  # another parameter over a block's memory
    model.register_parameter("alias", alias)
    names = _outside_blocks(model, model.blocks)
    assert "alias" not in names and {"embed.weight", "embed.bias"} <= names.keys()


class ToyMixer(nn.Module):
    """Attention-like: returns ``(o(relu(a(x)) · b(x)), None)``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, hidden), nn.Linear(width, hidden, bias=False)
        self.act = nn.ReLU()
        self.o = nn.Linear(hidden, width)

    def forward(self, x):
        return self.o(self.act(self.a(x)) * self.b(x)), None


class ToyFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ToyTailBlock(nn.Module):
    """Shaped like a Llama block: two submodules whose outputs are their last linear's."""

    def __init__(self, width: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = ToyMixer(width, hidden)
        self.ffn = ToyFeedForward(width, hidden)

    def forward(self, x, *, scale: float):
        x = x + self.mix(self.norm(x))[0]
        return x + scale * self.ffn(x)


TAIL_GROUPS = [["mix.a", "mix.b"], ["mix.o"], ["ffn.fc1"], ["ffn.fc2"]]


class ToyTailAdapter(ToyAdapter):
    def __init__(self, tails: dict[str, Tail]) -> None:
        self.tails = tails

    def linear_groups(self, block):
        return [list(group) for group in TAIL_GROUPS]

    def tail_linears(self, block):
        return dict(self.tails)


def _tails_of(block: nn.Module) -> dict[str, Tail]:
    return find_tails(block, lambda: block(torch.randn(2, 3, 16, dtype=torch.float64), scale=0.5))


def _toy_with_tails() -> tuple[ToyModel, list[torch.Tensor]]:
    torch.manual_seed(1)
    model = ToyModel()
    model.blocks = nn.ModuleList(ToyTailBlock() for _ in range(3))
    model = model.double()
    for block in model.blocks:
        for linear in wrap_linears(block, [name for group in TAIL_GROUPS for name in group]).values():
            linear.act_quantizer = ActivationQuantizer(4, clip_ratio=0.9)
    return model, [torch.randn(4, 10, 8, dtype=torch.float64) for _ in range(3)]


def test_find_tails_sees_the_submodules_that_return_a_linears_output():
    model, _ = _toy_with_tails()
    block = model.blocks[0]
    assert _tails_of(block) == {"mix": Tail("mix.o", 2), "ffn": Tail("ffn.fc2")}


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_tail_submodules_are_skipped_without_changing_the_result(method):
    """Once a tail's other linears are solved the engine applies the tail linear to its recorded input: the
    same weights bit for bit as running every submodule, with the mixer's and the MLP's activations run once
    per batch (in the pass that first needs them) instead of in every later pass."""
    results, calls = [], []
    for tails, reuse in ((True, True), (False, True), (False, False)):
        model, data = _toy_with_tails()
        adapter = ToyTailAdapter(_tails_of(model.blocks[0]) if tails else {})
        counts = {"mix": 0, "ffn": 0}
        for name in counts:
            model.blocks[1].get_submodule(f"{name}.act").register_forward_hook(
                lambda *_args, name=name, counts=counts: counts.__setitem__(name, counts[name] + 1))
        quantize_model(model, adapter, _settings(method, batch_size=4, reuse_outputs=reuse), data,
                       progress=False)
        results.append(_weights(model))
        calls.append(counts)
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)
    full_precision_pass = 1 if METHODS[method].needs_full_precision_stream else 0
    batches = len(data)
    assert calls[0] == {name: batches * (1 + full_precision_pass) for name in ("mix", "ffn")}
    assert calls[1] == {"mix": batches * (4 + full_precision_pass), "ffn": batches * (2 + full_precision_pass)}
