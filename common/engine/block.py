"""Calibration of one block: the paper's per-block loop (GPTAQ's Algorithm 2, for every method).

For a block with input streams ``X`` (full precision) and ``X̃`` (quantized):

1. full-precision pass: run the block on ``X``; keep each group's input and each linear's ``‖XWᵀ‖²``;
   ``X`` advances to the block's output;
2. for each group of linears that share an input, in true-sequential order:
   a. quantized pass: run the (partly quantized) block on ``X̃`` until the group's input is seen, and
      accumulate ``H = 2/N X̃ᵀX̃`` (and ``D = 2/N (X − X̃)ᵀX̃`` with the kept full-precision input);
   b. solve each linear of the group with its method and write its fake-quantized weight in place;
3. final pass: ``X̃`` advances to the (quantized) block's output.

Methods whose statistics are ``H`` alone skip step 1. Details that keep the passes cheap:

* Statistics are shared by the linears of a group that see the same input (same online transform and
  activation quantizer), so a q/k/v group accumulates one ``H`` (and ``D``), not three.
* Which solved linears replay their recorded outputs, which record them and which tail submodules are
  computed from one linear is planned up front (:func:`common.engine.plan.plan_passes`), so in the quantized
  stream attention and the MLP's hidden layer run once per block.
* Every per-batch tensor the block keeps (both streams, the full-precision inputs, recorded outputs) lives
  in a :class:`~common.batch_store.BatchStore`, one buffer per kind, out of the heap the forwards'
  temporaries churn through. The streams advance in place: each batch's block output overwrites its input.
* On the CPU, only the weights the current step reads are in memory (:class:`~common.weight_files.ResidentOnly`):
  a pass those of the linears it computes (:func:`common.engine.plan.weights_read`), a solve those of its
  group; the others wait in files. While the MLP's down projection is solved, the block holds one of its
  seven weights.
* Before each pass, memory the allocator freed is handed back to the system
  (:func:`common.memory.release_freed_memory`): the passes keep different tensors, and glibc would otherwise
  hold the freed ones' pages.
* Under torchrun the sums are reduced and the solves shared out by :mod:`common.engine.ranks`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from common.batch_store import BatchStore
from common.engine import ranks
from common.engine.adapter import ModelAdapter, block_linears
from common.engine.plan import Pass, plan_passes, weights_read
from common.engine.settings import CalibrationReport, CalibrationSettings, LayerRecord
from common.engine.wiring import StopForward, observing, recording_outputs, wired_batch
from common.memory import release_freed_memory
from common.profile import counting_flops
from common.quant.qlinear import QuantLinear, set_input_quantization
from common.solvers.statistics import CalibrationStatistics
from common.weight_files import ResidentOnly

logger = logging.getLogger(__name__)


class BlockCalibration:
    """The calibration of block ``index``: its passes over both streams and the solves of its linears.

    Args:
        index: the block's position in the model.
        block: the block, on ``settings.device``.
        adapter: the model family's adapter.
        block_kwargs: the keyword arguments the model passes the block, one dict per batch.
        settings: method and solver settings.
        report: where times, FLOPs and records go.
    """

    def __init__(self, index: int, block: nn.Module, adapter: ModelAdapter, block_kwargs: list[dict[str, Any]],
                 settings: CalibrationSettings, report: CalibrationReport) -> None:
        self.index, self.block, self.adapter = index, block, adapter
        self.block_kwargs, self.settings, self.report = block_kwargs, settings, report
        self.groups = adapter.linear_groups(block)
        self.linears = block_linears(adapter, block)
        self.tails = adapter.tail_linears(block) if settings.reuse_outputs else {}
        held = {module: [name for name in self.linears if name.startswith(f"{module}.")] for module in self.tails}
        self.held = held
        """``{tail submodule: the linears inside it}``."""
        for module, tail in self.tails.items():
            if tail.linear not in held[module]:
                raise ValueError(f"{type(adapter).__name__}.tail_linears: {tail.linear!r} is not one of the "
                                 f"quantized linears inside {module!r} ({held[module]})")
        self.passes = plan_passes(self.groups, {module: tail.linear for module, tail in self.tails.items()}, held,
                                  reuse_outputs=settings.reuse_outputs)
        self.outputs: dict[str, BatchStore] = {}
        """Recorded outputs of solved linears, replayed by later passes."""
        self.tail_inputs: dict[str, BatchStore] = {}
        """Kept inputs of tail linears (as their observers saw them), until their outputs are recorded."""

    def run(self, quant_stream: BatchStore, full_stream: BatchStore | None) -> list[LayerRecord]:
        """Quantize the block's linears; both streams advance in place to the block's outputs.

        ``full_stream`` is ``None`` for methods that read ``H`` alone (no full-precision stream).
        """
        full_inputs, reference_norms = {}, {}
        if full_stream is not None:  # 1. X: each group's input and ‖XWᵀ‖²; X advances
            full_inputs, reference_norms = self._full_precision_pass(full_stream)
        set_input_quantization(self.block, self.settings.quantize_activations)
        records: list[LayerRecord] = []
        weights = {name: linear.weight for name, linear in self.linears.items()}
        with ResidentOnly(weights, enabled=self.settings.device.type == "cpu") as resident:
            for step in self.passes[:-1]:  # 2. each group, in true-sequential order:
                resident.keep(self._weights_read(step))
                statistics = self._quantized_pass(step, quant_stream, full_inputs)  # a. X̃ → H (and D)
                resident.keep(step.group)
                records += self._solve_group(step.group, statistics, reference_norms)  # b. Ŵ, in place
                del statistics  # the group's float64 sums: not alive during the next group's pass
            resident.keep(self._weights_read(self.passes[-1]))
            self._final_pass(self.passes[-1], quant_stream)  # 3. X̃ advances
        set_input_quantization(self.block, True)
        return records

    def _weights_read(self, step: Pass) -> frozenset[str]:
        """The linears whose weights ``step`` reads (:func:`common.engine.plan.weights_read`)."""
        return weights_read(step, [tuple(group) for group in self.groups],
                            {module: tail.linear for module, tail in self.tails.items()}, self.held)

    def _sharing(self, group: tuple[str, ...]) -> dict[str, str]:
        """``{linear: the linear whose statistics it uses}``: the first earlier one with the same input."""
        shared: dict[str, str] = {}
        for name in group:
            linear = self.linears[name]
            shared[name] = next((other for other in dict.fromkeys(shared.values())
                                 if _same_input_preprocessing(self.linears[other], linear)), name)
        return shared

    def _full_precision_pass(self, full_stream: BatchStore) -> tuple[dict[str, BatchStore], dict[str, float]]:
        """Each group's full-precision input ``X`` and each linear's ``‖XWᵀ‖²`` (summed over processes);
        ``full_stream`` advances in place."""
        release_freed_memory()
        set_input_quantization(self.block, False)
        representatives = {rep for group in self.groups for rep in self._sharing(tuple(group)).values()}
        inputs = {name: full_stream.like() for name in representatives}
        norms = dict.fromkeys(self.linears, 0.0)

        def add_norm(name: str):
            bias = self.linears[name].bias

            def add(output: torch.Tensor) -> None:
                norms[name] += _squared_norm(output, bias)

            return add

        with recording_outputs(self.linears, {name: add_norm(name) for name in self.linears}):
            for batch, kwargs in enumerate(self.block_kwargs):
                seen = {name: [] for name in representatives}
                output = self._timed_forward(full_stream[batch], kwargs, observe=seen, stop=False)
                for name in representatives:
                    inputs[name][batch] = seen[name][0]
                full_stream[batch] = output
        return inputs, ranks.summed_norms(norms)

    def _quantized_pass(self, step: Pass, quant_stream: BatchStore, full_inputs: dict[str, BatchStore]
                        ) -> dict[str, CalibrationStatistics]:
        """``H`` (and ``D``) of ``step.group``'s inputs, summed over processes, keyed by each linear's
        representative (see :meth:`_sharing`). The group's full-precision inputs are released afterwards."""
        for name in step.drop_inputs:
            del self.tail_inputs[name]
        release_freed_memory()
        settings = self.settings
        shared = self._sharing(step.group)
        representatives = list(dict.fromkeys(shared.values()))
        asymmetric = settings.spec.needs_full_precision_stream
        stats = {
            name: CalibrationStatistics(
                self.linears[name].in_features, asymmetric=asymmetric, dtype=settings.stats_dtype,
                device=settings.device, name=f"block {self.index}: {name}",
            )
            for name in representatives
        }
        for name in step.record:
            self.outputs[name] = quant_stream.like()
        kept = self._keep_tail_inputs(step, shared, full_inputs, quant_stream)
        for batch, hidden in enumerate(quant_stream):
            seen = {name: [] for name in representatives}
            with wired_batch(self.block, self.linears, self.tails, step, batch, self.outputs, self.tail_inputs,
                             settings.device):
                self._timed_forward(hidden, self.block_kwargs[batch], observe=seen, stop=True)
            began = time.perf_counter()
            for name in representatives:
                full = full_inputs[name][batch].to(settings.device) if asymmetric else None
                stats[name].add(seen[name][0], full)
            grams = 2 if asymmetric else 1
            flops = sum(grams * 2 * seen[name][0].numel() * self.linears[name].in_features for name in representatives)
            self.report.add_part("statistics", time.perf_counter() - began, flops)
            for name, store in kept.items():
                store[batch] = seen[name][0]  # after the statistics: it may overwrite the batch's x_full
        for name in representatives:
            full_inputs.pop(name, None)  # in the statistics now: not needed while solving, nor again
        release_freed_memory()
        ranks.sum_statistics(stats)
        return {name: stats[shared[name]] for name in step.group}

    def _keep_tail_inputs(self, step: Pass, shared: Mapping[str, str], full_inputs: Mapping[str, BatchStore],
                          quant_stream: BatchStore) -> dict[str, BatchStore]:
        """``{representative: store}`` for the inputs of ``step.keep_inputs`` (registered in ``tail_inputs``).
        A representative's full-precision inputs are not read again once a batch's statistics are in, so its
        tail inputs overwrite them in the same buffer."""
        stores: dict[str, BatchStore] = {}
        for name in step.keep_inputs:
            representative = shared[name]
            if representative not in stores:
                reused = full_inputs.get(representative)
                stores[representative] = reused if reused is not None else quant_stream.like()
            self.tail_inputs[name] = stores[representative]
        return stores

    def _solve_group(self, group: tuple[str, ...], statistics: Mapping[str, CalibrationStatistics],
                     reference_norms: Mapping[str, float]) -> list[LayerRecord]:
        """Solve each linear of ``group`` from its statistics; its fake-quantized weight replaces its weight."""
        with ExitStack() as sums_in_files:  # each solve brings back the float64 sum it reads, one at a time
            for stats in {id(stats): stats for stats in statistics.values()}.values():
                sums_in_files.enter_context(stats.sums_in_files(last_use=True))
            records = ranks.solve_shared({name: self.linears[name] for name in group}, self._solve_cost,
                                         lambda name: self._solve(name, statistics[name], reference_norms.get(name)))
        for record in records:
            logger.info("block %d %-24s %s loss=%.4g output_error=%.4e damp=%.3g %.2fs", record.block, record.name,
                        record.method, record.loss, record.output_error, record.percdamp, record.seconds)
        return records

    def _final_pass(self, step: Pass, quant_stream: BatchStore) -> None:
        """Replace every batch of ``quant_stream`` by the block's output."""
        release_freed_memory()
        for batch in range(len(quant_stream)):
            with wired_batch(self.block, self.linears, self.tails, step, batch, self.outputs, self.tail_inputs,
                             self.settings.device):
                quant_stream[batch] = self._timed_forward(quant_stream[batch], self.block_kwargs[batch], observe={},
                                                          stop=False)
        self.outputs.clear()
        self.tail_inputs.clear()

    def _timed_forward(self, hidden: torch.Tensor, kwargs: dict[str, Any], *,
                       observe: dict[str, list[torch.Tensor]], stop: bool) -> torch.Tensor | None:
        """The block on ``hidden``, the inputs of the linears named in ``observe`` appended there (``stop``:
        the forward ends once each has been seen, and returns ``None``)."""
        wanted = {name: self.linears[name] for name in observe}
        began = time.perf_counter()
        with counting_flops() as counter, observing(wanted, observe, stop_when_complete=stop):
            try:
                output = self.adapter.run_block(self.block, hidden.to(self.settings.device),
                                                move_to(kwargs, self.settings.device))
            except StopForward:
                output = None
        self.report.add_part("forwards", time.perf_counter() - began, counter.get_total_flops())
        return output

    def _solve_cost(self, name: str) -> float:
        """The solve's floating-point operations (its method's FLOP model; ``m·n²`` without one)."""
        rows, columns = self.linears[name].weight.shape
        flops = self.settings.spec.flops
        return flops(rows, columns, self.settings.solver_for(name).blocksize) if flops else float(rows * columns**2)

    def _solve(self, name: str, stats: CalibrationStatistics, reference_norm: float | None) -> LayerRecord:
        """Ŵ of linear ``name`` by its method, written in place; its loss and relative output error."""
        linear, settings = self.linears[name], self.settings
        weight = linear.weight.detach()
        config = settings.solver_for(name)
        result = settings.spec.solve(weight, stats.hessian(), stats.drift(), config, name=f"block {self.index}: {name}",
                                     release_statistics=True)  # H and D handed over
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


def move_to(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(move_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value
