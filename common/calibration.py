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
full-precision input cache live on ``offload_device`` so large models fit one GPU. Once the first block's
inputs are computed, the parameters outside the blocks (embedding, head) wait in a file
(:func:`common.weight_files.parked`): calibration does not read them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from common import distributed
from common.batch_store import BatchStore
from common.gptaq import CalibrationStatistics, SolverConfig
from common.memory import release_freed_memory
from common.methods import METHODS, Method
from common.methods import method as get_method
from common.profile import counting_flops
from common.quant.qlinear import QuantLinear
from common.quant.quantizers import WeightGrid, rtn_quantize
from common.weight_files import parked

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Tail:
    """A submodule of a block whose output is one of its linears' output (an attention's output projection,
    an MLP's down projection): once the submodule's other linears are solved, that linear's input is final,
    and the engine computes the submodule as the linear applied to its input recorded earlier.

    Attributes:
        linear: the linear's name relative to the block.
        tuple_length: 0 if the submodule returns the linear's output itself; else it returns a tuple of this
            length, the output first and ``None`` after it (a Hugging Face attention's ``(output, weights)``).
    """

    linear: str
    tuple_length: int = 0


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

    def tail_linears(self, block: nn.Module) -> dict[str, Tail]:
        """``{submodule name: Tail}`` for the submodules of ``block`` whose output is a linear's output (may be
        empty: the engine then runs every submodule in every pass)."""


def find_tails(block: nn.Module, forward: Callable[[], object]) -> dict[str, Tail]:
    """The submodules of ``block`` that are a :class:`Tail`, seen in one call of ``forward`` (which runs it).

    A submodule qualifies when it holds at least two :class:`QuantLinear` and returns the very tensor one of
    them returned (alone, or first in a tuple whose other items are ``None``); of nested ones, the outermost.
    """
    outputs: dict[str, object] = {}
    handles = [module.register_forward_hook(lambda _m, _a, out, name=name: outputs.setdefault(name, out))
               for name, module in block.named_modules() if name]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    linears = [name for name, module in block.named_modules() if isinstance(module, QuantLinear)]
    tails: dict[str, Tail] = {}
    for name, output in outputs.items():
        inside = [linear for linear in linears if linear.startswith(f"{name}.")]
        packed = isinstance(output, tuple) and len(output) > 1 and all(item is None for item in output[1:])
        result = output[0] if packed else output
        tail = next((linear for linear in inside if outputs.get(linear) is result), None)
        if len(inside) >= 2 and tail is not None:
            tails[name] = Tail(tail, len(output) if packed else 0)
    return {name: tail for name, tail in tails.items() if not any(name.startswith(f"{other}.") for other in tails)}


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
        reuse_outputs: keep each solved linear's outputs for the block's later passes instead of computing
            them again (memory: one block's linear outputs for every sample, on ``offload_device``).
    """

    method: str
    solver: SolverConfig
    act_quant_during_calibration: bool | None = None
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_device: torch.device | None = None
    stats_dtype: torch.dtype = torch.float32
    linear_solvers: Mapping[str, SolverConfig] = field(default_factory=dict)
    reuse_outputs: bool = True

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
    parts: dict[str, list[float]] = field(default_factory=dict)
    """``{"forwards" | "statistics" | "solves": [seconds, flops]}``: where calibration spent its time."""

    def add_part(self, part: str, seconds: float, flops: float) -> None:
        totals = self.parts.setdefault(part, [0.0, 0.0])
        totals[0] += seconds
        totals[1] += flops

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
    progress = progress and distributed.progress_bars()
    if not settings.spec.calibrated:
        for index, block in enumerate(tqdm(blocks, desc=settings.method, disable=not progress)):
            for name, linear in _group_linears(adapter, block):
                began = time.perf_counter()
                with torch.no_grad():
                    original = linear.weight.detach().clone()
                    quantized, linear.weight_grid = _rtn(linear.weight, settings.solver_for(name))
                    linear.weight.copy_(quantized)
                report.layers.append(
                    LayerRecord(index, name, settings.method, *original.shape, float("nan"), float("nan"), 0.0,
                                time.perf_counter() - began)
                )
        report.seconds = time.perf_counter() - start
        return report
    if not calibration_batches:
        raise ValueError(f"calibration_batches must not be empty for method {settings.method!r}")

    with torch.no_grad():
        first_inputs, block_kwargs = _first_block_inputs(model, adapter, blocks[0], calibration_batches, settings)
        quant_stream = BatchStore.of(first_inputs, settings.offload_device or settings.device)
        del first_inputs
        with parked(_outside_blocks(model, blocks)):
            _calibrate_blocks(blocks, adapter, settings, quant_stream, block_kwargs, report, progress)
            del quant_stream
            release_freed_memory()  # before the parked parameters come back
    report.seconds = time.perf_counter() - start
    return report


def _calibrate_blocks(blocks: Sequence[nn.Module], adapter: ModelAdapter, settings: CalibrationSettings,
                      quant_stream: BatchStore, block_kwargs: list[dict[str, Any]], report: CalibrationReport,
                      progress: bool) -> None:
    """Calibrate every block in order, both streams starting from ``quant_stream`` (the first block's inputs).

    On the CPU, the blocks not being calibrated wait in a file (:func:`common.weight_files.parked`): in the
    embedded run that is 29 of the 30 blocks (0.41 of 0.42 GB) out of the resident set while a block calibrates.
    """
    full_stream = quant_stream.clone() if settings.spec.needs_full_precision_stream else None
    bar = tqdm(list(enumerate(blocks)), desc=settings.method, disable=not progress)
    park = settings.device.type == "cpu"
    waiting: dict[int, AbstractContextManager] = {}
    try:
        if park:
            for index, block in enumerate(blocks):
                if index > 0:
                    waiting[index] = _park(block)
        for index, block in bar:
            if index in waiting:
                waiting.pop(index).__exit__(None, None, None)
            original_device = _module_device(block)
            block.to(settings.device)
            records, quant_stream, full_stream = _BlockCalibration(
                index, block, adapter, block_kwargs, settings, report
            ).run(quant_stream, full_stream)
            block.to(original_device)
            if park:
                waiting[index] = _park(block)
            report.layers.extend(records)
            bar.set_postfix(err=f"{sum(r.output_error for r in records) / len(records):.2e}")
    finally:
        for index in list(waiting):
            waiting.pop(index).__exit__(None, None, None)


def _park(block: nn.Module) -> AbstractContextManager:
    """``block``'s parameters parked (entered: the caller exits it to bring them back)."""
    context = parked(dict(block.named_parameters()))
    context.__enter__()
    return context


def _outside_blocks(model: nn.Module, blocks: Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    """The model's parameters that no block holds or shares memory with (a language model's embedding and
    head): once the first block's inputs are computed, calibration never reads them."""
    inside = [parameter for block in blocks for parameter in block.parameters()]
    held = {id(parameter) for parameter in inside}
    spans = [_span(parameter) for parameter in inside]
    return {
        name: parameter for name, parameter in model.named_parameters()
        if id(parameter) not in held and not any(_overlap(_span(parameter), span) for span in spans)
    }


def _span(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """Where the memory behind a tensor lies (its whole storage): device, first byte address, one past the last."""
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _overlap(a: tuple[torch.device, int, int], b: tuple[torch.device, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _rtn(weight: torch.Tensor, solver: SolverConfig) -> tuple[torch.Tensor, WeightGrid | None]:
    return rtn_quantize(weight, bits=solver.bits, sym=solver.sym, groupsize=solver.groupsize, mse=solver.mse,
                        grid_format=solver.grid)


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
        for batch in distributed.shard(_rebatch(batches, settings.batch_size)):
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


def set_input_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch activation quantization on or off in every submodule that has a ``quantize_input`` flag.

    :class:`QuantLinear` has one; so may other online quantizers (e.g. a KV-cache quantizer), which keeps
    the full-precision stream free of every kind of quantization.
    """
    for module in model.modules():
        if hasattr(module, "quantize_input"):
            module.quantize_input = enabled


def clear_weight_grids(model: nn.Module) -> None:
    """Forget the recorded weight grids (the weights were restored to full precision)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weight_grid = None


class _BlockCalibration:
    """Calibration of one block: the full-precision pass, a quantized-stream pass per group, the final pass.

    * Statistics are shared by the linears of a group that see the same input (same online transform and
      activation quantizer), so a q/k/v group accumulates one ``H`` (and ``D``), not three.
    * The full-precision pass runs on the block itself (nothing in it is quantized yet) with activation
      quantization off: it records each group's input (for ``D``) and each linear's ``‖xWᵀ‖²`` (the
      reference of its relative output error) and the block's output (the next block's full-precision input).
    * Quantized passes stop as soon as the group's inputs are seen. With ``reuse_outputs``, a linear's
      output is recorded in the first pass after its group is solved and replayed in the later ones (its
      inputs depend only on weights that are already final), so each linear is computed once per pass
      structure instead of once per later group. The last group's pass records nothing: what it would
      record (the outputs of the group before, an MLP's wide hidden layer) would serve the final pass alone.
    * Also with ``reuse_outputs``, a submodule the adapter names as a :class:`Tail` (its output is one
      linear's) is not run once its other linears are solved: the tail linear's input, seen in its group's
      pass, is recorded, and later passes apply the linear to it (or replay its output). So in the quantized
      stream attention and the MLP's hidden layer are computed once per block (the final pass multiplies the
      down projection's recorded input), and the other linears inside such a submodule are not recorded.
    * Every per-batch tensor the block keeps (both streams, the full-precision inputs, recorded outputs) lives
      in a :class:`~common.batch_store.BatchStore`, one buffer per kind, out of the heap the forwards'
      temporaries churn through. The streams advance in place: each batch's block output overwrites its
      input.
    * Before each pass, memory the allocator freed is handed back to the system: the passes keep different
      tensors, and glibc would otherwise hold the freed ones' pages (measured in the embedded W4A4 GPTAQ
      calibration: 0.12–0.27 GB less peak resident memory, forwards about 5 % slower as pages fault back).
    """

    def __init__(self, index: int, block: nn.Module, adapter: ModelAdapter, block_kwargs: list[dict[str, Any]],
                 settings: CalibrationSettings, report: CalibrationReport) -> None:
        self.index, self.block, self.adapter = index, block, adapter
        self.block_kwargs, self.settings, self.report = block_kwargs, settings, report
        self.groups = adapter.linear_groups(block)
        self.linears = {name: _quant_linear(block, name) for group in self.groups for name in group}
        self.outputs: dict[str, BatchStore] = {}
        """Recorded linear outputs, per linear (batches laid out as ``layout``'s)."""
        self.tails = adapter.tail_linears(block) if settings.reuse_outputs else {}
        self.inside = {module: [name for name in self.linears if name.startswith(f"{module}.")]
                       for module in self.tails}
        """``{tail submodule: the linears inside it}``."""
        for module, tail in self.tails.items():
            if tail.linear not in self.inside[module]:
                raise ValueError(f"{type(adapter).__name__}.tail_linears: {tail.linear!r} is not one of the "
                                 f"quantized linears inside {module!r} ({self.inside[module]})")
        self.tail_inputs: dict[str, BatchStore] = {}
        """Recorded inputs of tail linears (as their observers saw them), kept until their outputs are."""
        self.layout: BatchStore | None = None
        """The quantized stream: every per-batch store of the block has its batches' rows."""
        self.batch = 0

    def run(self, quant_stream: BatchStore, full_stream: BatchStore | None
            ) -> tuple[list[LayerRecord], BatchStore, BatchStore | None]:
        """Quantize the block; returns its records and both streams, advanced in place to its outputs."""
        self.layout = quant_stream
        full_inputs: dict[str, BatchStore] = {}
        reference_norms: dict[str, float] = {}
        if full_stream is not None:
            release_freed_memory()
            full_inputs, reference_norms = self._full_precision_pass(full_stream)
            reference_norms = distributed.sum_floats(reference_norms)
        set_input_quantization(self.block, self.settings.quantize_activations)
        records: list[LayerRecord] = []
        solved: list[str] = []
        for position, group in enumerate(self.groups):
            shared = self._sharing(group)
            last = position == len(self.groups) - 1
            for name in [name for name in self.tail_inputs if self._complete(name)]:
                del self.tail_inputs[name]  # its output is replayed from now on
            release_freed_memory()
            stats = self._group_statistics(group, shared, quant_stream, full_inputs, solved,
                                           record_new=not last)
            for name in set(shared.values()):
                full_inputs.pop(name, None)  # in the statistics now: not needed while solving, nor again
            release_freed_memory()
            for statistics in stats.values():
                statistics.reduce_(distributed.sum_)
            owners = distributed.assign_by_cost({name: self._solve_cost(name) for name in group})
            for name in group:
                record = None
                if owners[name] == distributed.rank():
                    record = self._solve(name, stats[shared[name]], reference_norms.get(name))
                record = self._share_solution(name, record, owners[name])
                logger.info(
                    "block %d %-24s %s loss=%.4g output_error=%.4e damp=%.3g %.2fs", record.block, name,
                    record.method, record.loss, record.output_error, record.percdamp, record.seconds,
                )
                records.append(record)
            solved += group
        release_freed_memory()
        self._forward_all(quant_stream, solved)
        set_input_quantization(self.block, True)
        self.outputs.clear()
        self.tail_inputs.clear()
        return records, quant_stream, full_stream

    def _sharing(self, group: list[str]) -> dict[str, str]:
        """``{linear: the linear whose statistics it uses}``: the first earlier one with the same input."""
        shared: dict[str, str] = {}
        for name in group:
            linear = self.linears[name]
            shared[name] = next((other for other in dict.fromkeys(shared.values())
                                 if _same_input_preprocessing(self.linears[other], linear)), name)
        return shared

    def _full_precision_pass(self, full_stream: BatchStore) -> tuple[dict[str, BatchStore], dict[str, float]]:
        """Each group's full-precision inputs and each linear's ``‖xWᵀ‖²``; ``full_stream`` advances in place."""
        set_input_quantization(self.block, False)
        representatives = {rep for group in self.groups for rep in self._sharing(group).values()}
        inputs = {name: full_stream.like() for name in representatives}
        norms = dict.fromkeys(self.linears, 0.0)

        def norm_of(name: str):
            bias = self.linears[name].bias

            def record(output: torch.Tensor) -> None:
                norms[name] += _squared_norm(output, bias)

            return record

        for linear_name in self.linears:
            self.linears[linear_name].recorder = norm_of(linear_name)
        try:
            for batch, kwargs in enumerate(self.block_kwargs):
                self.batch = batch
                seen = {name: [] for name in representatives}
                output = self._timed_forward(full_stream[batch], kwargs, observe=seen, stop=False)
                for name in representatives:
                    inputs[name][batch] = seen[name][0]
                full_stream[batch] = output
        finally:
            for linear in self.linears.values():
                linear.recorder = None
        return inputs, norms

    def _group_statistics(self, group, shared, quant_stream, full_inputs, solved, *, record_new: bool):
        settings = self.settings
        representatives = list(dict.fromkeys(shared.values()))
        asymmetric = self.settings.spec.needs_full_precision_stream
        stats = {
            name: CalibrationStatistics(
                self.linears[name].in_features, asymmetric=asymmetric, dtype=settings.stats_dtype,
                device=settings.device, name=f"block {self.index}: {name}",
            )
            for name in representatives
        }
        replay, record = self._reuse(solved, group, record_new=record_new)
        shortcuts = self._shortcuts(solved)
        tail_stores = self._tail_stores(group, shared, solved, full_inputs)
        for batch, hidden in enumerate(quant_stream):
            self.batch = batch
            seen = {name: [] for name in representatives}
            self._forward(hidden, self.block_kwargs[batch], replay, record, seen, shortcuts, stop=True)
            began = time.perf_counter()
            for name in representatives:
                full = full_inputs[name][batch].to(settings.device) if asymmetric else None
                stats[name].add(seen[name][0], full)
            columns = [self.linears[name].in_features for name in representatives]
            grams = 2 if asymmetric else 1
            flops = sum(grams * 2 * seen[name][0].numel() * n for name, n in zip(representatives, columns,
                                                                                   strict=True))
            self.report.add_part("statistics", time.perf_counter() - began, flops)
            for name, store in tail_stores.items():
                store[batch] = seen[name][0]  # after the statistics: it may overwrite the batch's x_full
        return stats

    def _tail_stores(self, group, shared, solved, full_inputs) -> dict[str, BatchStore]:
        """``{representative: store}`` for the inputs of the group's tail linears that later passes multiply
        (registered in ``tail_inputs``). A representative's full-precision inputs are not read again once a
        batch's statistics are in, so its tail inputs overwrite them in the same buffer."""
        stores: dict[str, BatchStore] = {}
        for name in group:
            if self._final_tail(name, [*solved, *group]):
                representative = shared[name]
                if representative not in stores:
                    reused = full_inputs.get(representative)
                    stores[representative] = reused if reused is not None else self.layout.like()
                self.tail_inputs[name] = stores[representative]
        return stores

    def _complete(self, name: str) -> bool:
        return name in self.outputs and self.outputs[name].complete

    def _reuse(self, solved: list[str], group: list[str], *, record_new: bool) -> tuple[list[str], list[str]]:
        """Which solved linears replay their recorded outputs in the pass of ``group``, and which record them.

        Linears inside a tail submodule that later passes will not run (its tail linear's input is final by
        the end of this pass) are not recorded: nothing would replay them.
        """
        if not self.settings.reuse_outputs:
            return [], []
        replay = [name for name in solved if self._complete(name)]
        if not record_new:
            return replay, []
        final = [*solved, *group]
        skipped = {name for module, tail in self.tails.items() if self._final_tail(tail.linear, final)
                   for name in self.inside[module] if name != tail.linear}
        return replay, [name for name in solved if not self._complete(name) and name not in skipped]

    def _final_tail(self, name: str, solved: list[str]) -> bool:
        """Whether ``name`` is a tail linear whose submodule's other linears are all in ``solved``."""
        return any(tail.linear == name and set(self.inside[module]) - {name} <= set(solved)
                   for module, tail in self.tails.items())

    def _shortcuts(self, solved: list[str]) -> list[str]:
        """The tail submodules computed from their tail linear alone in a pass after ``solved`` are solved."""
        return [module for module, tail in self.tails.items()
                if self._final_tail(tail.linear, solved)
                and (self._complete(tail.linear) or (tail.linear in self.tail_inputs
                                                     and self.tail_inputs[tail.linear].complete))]

    def _forward(self, hidden, kwargs, replay: list[str], record: list[str], observe, shortcuts: list[str], *,
                 stop: bool):
        for name in replay:
            self.linears[name].replay = self._replay(name)
        for name in record:
            self.linears[name].recorder = self._recorder(name)
        for module in shortcuts:
            self.block.get_submodule(module).forward = self._shortcut(self.tails[module])
        try:
            return self._timed_forward(hidden, kwargs, observe=observe, stop=stop)
        finally:
            for name in [*replay, *record]:
                self.linears[name].replay = None
                self.linears[name].recorder = None
            for module in shortcuts:
                del self.block.get_submodule(module).forward

    def _forward_all(self, stream: BatchStore, solved: list[str]) -> None:
        """Replace every batch of ``stream`` by the block's output (the last pass: nothing more to record)."""
        replay, record = self._reuse(solved, [], record_new=False)
        shortcuts = self._shortcuts(solved)
        for batch in range(len(stream)):
            self.batch = batch
            stream[batch] = self._forward(stream[batch], self.block_kwargs[batch], replay, record, {}, shortcuts,
                                          stop=False)

    def _shortcut(self, tail: Tail):
        """A submodule's forward that applies its tail linear to the recorded input (or replays its output)."""
        linear = self.linears[tail.linear]

        def forward(*_args, **_kwargs):
            inputs = self.tail_inputs.get(tail.linear)
            x = None if inputs is None else inputs[self.batch].to(self.settings.device)
            output = linear(x, prepared=True)
            return (output, *[None] * (tail.tuple_length - 1)) if tail.tuple_length else output

        return forward

    def _replay(self, name: str):
        def replay() -> torch.Tensor | None:
            store = self.outputs.get(name)
            cached = None if store is None else store.get(self.batch)
            return None if cached is None else cached.to(self.settings.device)

        return replay

    def _recorder(self, name: str):
        def record(output: torch.Tensor) -> None:
            if name not in self.outputs:
                self.outputs[name] = self.layout.like()
            self.outputs[name][self.batch] = output

        return record

    def _timed_forward(self, hidden, kwargs, *, observe: dict[str, list[torch.Tensor]], stop: bool):
        wanted = {name: self.linears[name] for name in observe}
        began = time.perf_counter()
        with counting_flops() as counter, _observing(wanted, observe, stop_when_complete=stop):
            output = _run(self.adapter, self.block, hidden, kwargs, self.settings.device)
        self.report.add_part("forwards", time.perf_counter() - began, counter.get_total_flops())
        return output

    def _solve_cost(self, name: str) -> float:
        """The solve's floating-point operations (its method's FLOP model; ``m·n²`` without one)."""
        rows, columns = self.linears[name].weight.shape
        flops = self.settings.spec.flops
        return flops(rows, columns, self.settings.solver_for(name).blocksize) if flops else float(rows * columns**2)

    def _share_solution(self, name: str, record: LayerRecord | None, owner: int) -> LayerRecord:
        """Give every rank the owner's quantized weight, grid and record (a no-op in one process)."""
        if not distributed.active():
            return record
        linear = self.linears[name]
        with torch.no_grad():
            distributed.broadcast_(linear.weight.data, owner)
        grid = linear.weight_grid if owner == distributed.rank() else None
        grid, record = distributed.broadcast_object((grid.to("cpu") if grid is not None else None, record), owner)
        linear.weight_grid = grid.to(linear.weight.device) if grid is not None else None
        return record

    def _solve(self, name: str, stats: CalibrationStatistics, reference_norm: float | None) -> LayerRecord:
        linear, settings = self.linears[name], self.settings
        weight = linear.weight.detach()
        config = settings.solver_for(name)
        result = settings.spec.solve(weight, stats.hessian(), stats.drift(), config,
                                     name=f"block {self.index}: {name}")
        error = stats.output_error(weight, result.weight, reference_norm)
        with torch.no_grad():
            linear.weight.copy_(result.weight)
        linear.weight_grid = result.grid
        flops = settings.spec.flops(*weight.shape, config.blocksize) if settings.spec.flops else 0.0
        self.report.add_part("solves", result.seconds, flops)
        return LayerRecord(self.index, name, settings.method, *weight.shape, result.loss, error, result.percdamp,
                           result.seconds)


_NORM_ROWS = 1024
"""Rows per slice in :func:`_squared_norm` (its float64 temporaries: ``2 × 1024 × features`` values)."""


def _squared_norm(output: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``‖output − bias‖²`` over every row of ``output`` [..., features], in float64.

    A slice of rows at a time: a float64 copy of a whole batch's output (50 MB for an MLP's hidden layer in
    the embedded run) would dominate the full-precision pass's memory.
    """
    total = torch.zeros((), dtype=torch.float64, device=output.device)
    for part in output.reshape(-1, output.shape[-1]).split(_NORM_ROWS):
        total += (part.double() if bias is None else part.double() - bias.double()).square().sum()
    return float(total)


def _same_input_preprocessing(a: QuantLinear, b: QuantLinear) -> bool:
    """Whether two linears that read the same tensor multiply the same input (same transform and quantizer)."""
    same_transform = a.input_transform is b.input_transform or (a.input_transform is None and b.input_transform
                                                                  is None)
    return same_transform and a.act_quantizer.extra_repr() == b.act_quantizer.extra_repr()


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


def _run(adapter: ModelAdapter, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
         device: torch.device) -> torch.Tensor | None:
    try:
        return adapter.run_block(block, hidden.to(device), _to(kwargs, device))
    except _StopForward:
        return None
