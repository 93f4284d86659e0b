"""Two-stream, layer-by-layer calibration engine for every method of :mod:`common.methods`.

The engine knows nothing of Llama or ViT. A model family supplies a :class:`ModelAdapter`: which modules
are the blocks, which linears of a block share an input (true-sequential groups, e.g. q,k,v → o →
gate,up → down), how to run the model up to its first block, and how to run one block.

Calibration walks the blocks in order and keeps two streams of block inputs, each [samples, ...]:

* the full-precision stream ``X``: the model with neither weight nor activation quantization (methods whose
  statistics include ``D``);
* the quantized stream ``X̃``: the model with every earlier block (and earlier groups of this block)
  already quantized.

For each group of linears it runs the quantized block on ``X̃`` (stopping as soon as the group's inputs
are seen), accumulates ``H`` (and, with the full-precision inputs of the same linears cached from one
full-precision pass of the block, ``D``), solves every linear of the group with the method's solve
function and writes its fake-quantized weight in place. Then both streams advance through the block.

Protocols: each method declares whether activations are quantized in the quantized stream while it
calibrates (the paper's protocol: on for the asymmetric methods, off for GPTQ: weights first, activations
quantized afterwards); ``act_quant_during_calibration`` overrides this for every method.

The linears named by the adapter must be :class:`common.quant.qlinear.QuantLinear` (their activation
quantizers configured by the caller). Blocks are moved to ``device`` one at a time; the streams and the
full-precision input cache live on ``offload_device`` so large models fit one GPU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from common.gptaq import CalibrationStatistics, SolverConfig
from common.methods import METHODS, Method
from common.methods import method as get_method
from common.quant.qlinear import QuantLinear
from common.quant.quantizers import rtn_quantize_weight

logger = logging.getLogger(__name__)



class ModelAdapter(Protocol):
    """What the engine needs to know about a model family."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The blocks to calibrate, in forward order."""

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """Names (relative to ``block``) of its linears, grouped by shared input, in true-sequential order."""

    def run_prologue(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        """Run ``model`` on ``batch`` far enough that its first block is called (the engine stops it there)."""

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Run one block on ``hidden`` with the keyword arguments the model passed it; return its output."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How to quantize the weights of the adapter's linears.

    Attributes:
        method: the name of a quantizing method of :data:`common.methods.METHODS` (``rtn`` or calibrated).
        solver: solver settings (bits, groups, damping, ...); the method's own overrides are applied.
        act_quant_during_calibration: ``None`` for the method's protocol; ``True``/``False`` for any method.
        batch_size: samples per block forward.
        device: where each block is computed.
        offload_device: where the streams and the full-precision input cache are kept (default ``device``).
        stats_dtype: accumulation dtype of ``H`` and ``D``.
        linear_solvers: solver settings for particular linears, by name within a block (e.g. QEP's
            excluded linears with ``qep_alpha = 0``).
    """

    method: str
    solver: SolverConfig
    act_quant_during_calibration: bool | None = None
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_device: torch.device | None = None
    stats_dtype: torch.dtype = torch.float32
    linear_solvers: Mapping[str, SolverConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not get_method(self.method).quantized:
            raise ValueError(f"method must be a quantizing method, one of "
                             f"{tuple(n for n, m in METHODS.items() if m.quantized)}, got {self.method!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @property
    def spec(self) -> Method:
        """The method's registry entry."""
        return METHODS[self.method]

    @property
    def quantize_activations(self) -> bool:
        """Whether the quantized stream quantizes activations while calibrating."""
        if self.act_quant_during_calibration is not None:
            return self.act_quant_during_calibration
        return self.spec.act_quant_during_calibration

    def solver_for(self, linear: str) -> SolverConfig:
        """The solver settings of ``linear`` (a name within a block), the method's overrides applied."""
        return self.spec.solver_config(self.linear_solvers.get(linear, self.solver))


@dataclass(frozen=True)
class LayerRecord:
    """Per-linear outcome: the solver's proxy loss and the relative output error on the calibration data."""

    block: int
    name: str
    method: str
    rows: int
    columns: int
    loss: float
    output_error: float
    percdamp: float
    seconds: float


@dataclass
class CalibrationReport:
    """Everything calibration measured, in block order."""

    method: str
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0

    def mean_output_error(self) -> float:
        errors = [layer.output_error for layer in self.layers if layer.output_error == layer.output_error]
        return sum(errors) / len(errors) if errors else float("nan")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been seen."""


def quantize_model(
    model: nn.Module,
    adapter: ModelAdapter,
    settings: CalibrationSettings,
    calibration_batches: Sequence[Any] = (),
    *,
    progress: bool = True,
) -> CalibrationReport:
    """Fake-quantize the weights of every linear the adapter names, in place.

    Args:
        model: the model (its linears already :class:`QuantLinear`).
        adapter: the model family's adapter.
        settings: method and solver settings.
        calibration_batches: inputs for ``adapter.run_prologue`` (unused by RTN).
        progress: show a progress bar over blocks.
    """
    start = time.perf_counter()
    report = CalibrationReport(settings.method)
    blocks = adapter.blocks(model)
    if not settings.spec.calibrated:
        for index, block in enumerate(tqdm(blocks, desc=settings.method, disable=not progress)):
            for name, linear in _group_linears(adapter, block):
                began = time.perf_counter()
                with torch.no_grad():
                    original = linear.weight.detach().clone()
                    linear.weight.copy_(_rtn(linear.weight, settings.solver_for(name)))
                report.layers.append(
                    LayerRecord(index, name, settings.method, *original.shape, float("nan"), float("nan"), 0.0,
                                time.perf_counter() - began)
                )
        report.seconds = time.perf_counter() - start
        return report
    if not calibration_batches:
        raise ValueError(f"calibration_batches must not be empty for method {settings.method!r}")

    offload = settings.offload_device or settings.device
    with torch.no_grad():
        quant_stream, block_kwargs = _first_block_inputs(model, adapter, blocks[0], calibration_batches, settings)
        quant_stream = [h.to(offload) for h in quant_stream]
        full_stream = [h.clone() for h in quant_stream] if settings.spec.needs_full_precision_stream else None
        bar = tqdm(list(enumerate(blocks)), desc=settings.method, disable=not progress)
        for index, block in bar:
            original_device = _module_device(block)
            block.to(settings.device)
            records, quant_stream, full_stream = _calibrate_block(
                index, block, adapter, quant_stream, full_stream, block_kwargs, settings, offload
            )
            block.to(original_device)
            report.layers.extend(records)
            bar.set_postfix(err=f"{sum(r.output_error for r in records) / len(records):.2e}")
    report.seconds = time.perf_counter() - start
    return report


def _rtn(weight: torch.Tensor, solver: SolverConfig) -> torch.Tensor:
    return rtn_quantize_weight(weight, bits=solver.bits, sym=solver.sym, groupsize=solver.groupsize, mse=solver.mse)


def _group_linears(adapter: ModelAdapter, block: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for group in adapter.linear_groups(block):
        for name in group:
            yield name, _quant_linear(block, name)


def _quant_linear(block: nn.Module, name: str) -> QuantLinear:
    module = block.get_submodule(name)
    if not isinstance(module, QuantLinear):
        raise TypeError(f"{name} must be a QuantLinear (common.quant.qlinear) to be calibrated, got "
                        f"{type(module).__name__}")
    return module


def _module_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _first_block_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    first_block: nn.Module,
    batches: Sequence[Any],
    settings: CalibrationSettings,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states [batch, ...] entering the first block for each batch, and the keyword arguments."""
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def catch(_module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in _rebatch(batches, settings.batch_size):
            try:
                adapter.run_prologue(model, batch, settings.device)
            except _StopForward:
                continue
            raise RuntimeError("adapter.run_prologue returned without calling the first block")
    finally:
        handle.remove()
    return hidden, kwargs_list


def _rebatch(batches: Sequence[Any], batch_size: int) -> list[Any]:
    """Concatenate tensor batches and split them into ``batch_size`` samples; other inputs pass as given."""
    if batches and all(isinstance(b, torch.Tensor) for b in batches):
        return list(torch.cat(list(batches)).split(batch_size))
    return list(batches)


@contextmanager
def _observing(linears: dict[str, QuantLinear], sink: dict[str, list[torch.Tensor]], stop_when_complete: bool):
    """Record each linear's (transformed, quantized) input into ``sink``; optionally stop the forward early."""
    seen: set[str] = set()

    def make_observer(name: str):
        def observe(x: torch.Tensor) -> None:
            sink[name].append(x)
            seen.add(name)
            if stop_when_complete and seen == linears.keys():
                seen.clear()
                raise _StopForward

        return observe

    for name, linear in linears.items():
        linear.observer = make_observer(name)
    try:
        yield
    finally:
        for linear in linears.values():
            linear.observer = None


def set_input_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch activation quantization on or off in every submodule that has a ``quantize_input`` flag.

    :class:`QuantLinear` has one; so may other online quantizers (e.g. a KV-cache quantizer), which keeps
    the full-precision stream free of every kind of quantization.
    """
    for module in model.modules():
        if hasattr(module, "quantize_input"):
            module.quantize_input = enabled


def _run(adapter: ModelAdapter, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
         device: torch.device) -> torch.Tensor | None:
    try:
        return adapter.run_block(block, hidden.to(device), _to(kwargs, device))
    except _StopForward:
        return None


def _calibrate_block(
    index: int,
    block: nn.Module,
    adapter: ModelAdapter,
    quant_stream: list[torch.Tensor],
    full_stream: list[torch.Tensor] | None,
    block_kwargs: list[dict[str, Any]],
    settings: CalibrationSettings,
    offload: torch.device,
) -> tuple[list[LayerRecord], list[torch.Tensor], list[torch.Tensor] | None]:
    device = settings.device
    groups = adapter.linear_groups(block)
    linears = {name: _quant_linear(block, name) for group in groups for name in group}

    full_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    next_full = None
    if full_stream is not None:
        reference = copy.deepcopy(block)
        set_input_quantization(reference, False)
        reference_linears = {name: _quant_linear(reference, name) for name in linears}
        next_full = []
        with _observing(reference_linears, full_inputs, stop_when_complete=False):
            for hidden, kwargs in zip(full_stream, block_kwargs, strict=True):
                next_full.append(_run(adapter, reference, hidden, kwargs, device).to(offload))
        full_inputs = {name: [x.to(offload) for x in xs] for name, xs in full_inputs.items()}
        del reference

    set_input_quantization(block, settings.quantize_activations)
    records = []
    for group in groups:
        stats = {
            name: CalibrationStatistics(
                linears[name].in_features, asymmetric=full_stream is not None, dtype=settings.stats_dtype,
                device=device, name=f"block {index}: {name}",
            )
            for name in group
        }
        for batch_index, (hidden, kwargs) in enumerate(zip(quant_stream, block_kwargs, strict=True)):
            seen: dict[str, list[torch.Tensor]] = {name: [] for name in group}
            with _observing({name: linears[name] for name in group}, seen, stop_when_complete=True):
                _run(adapter, block, hidden, kwargs, device)
            for name in group:
                full = full_inputs[name][batch_index].to(device) if full_stream is not None else None
                stats[name].add(seen[name][0], full)
        for name in group:
            records.append(_solve_linear(index, name, linears[name], stats[name], settings))
            full_inputs.pop(name, None)

    next_quant = [_run(adapter, block, h, kw, device).to(offload) for h, kw in zip(quant_stream, block_kwargs,
                                                                                     strict=True)]
    set_input_quantization(block, True)
    return records, next_quant, next_full


def _solve_linear(
    index: int, name: str, linear: QuantLinear, stats: CalibrationStatistics, settings: CalibrationSettings
) -> LayerRecord:
    weight = linear.weight.detach()
    result = settings.spec.solve(weight, stats.hessian(), stats.drift(), settings.solver_for(name), name=stats.name)
    error = stats.output_error(weight, result.weight)
    with torch.no_grad():
        linear.weight.copy_(result.weight)
    logger.info(
        "block %d %-24s %s loss=%.4g output_error=%.4e damp=%.3g %.2fs",
        index, name, settings.method, result.loss, error, result.percdamp, result.seconds,
    )
    return LayerRecord(index, name, settings.method, *weight.shape, result.loss, error, result.percdamp,
                       result.seconds)
