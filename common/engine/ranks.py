"""Every collective the engine makes when torchrun runs several processes (each a no-op in one process).

Each process calibrates its shard of the calibration batches; the sums that make ``H``, ``D`` and the
reference norms are summed over processes, each linear of a group is solved by one process (balanced by the
solve's FLOP count), and its quantized weight, grid and record are handed to the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from common import distributed
from common.engine.settings import LayerRecord
from common.quant.qlinear import QuantLinear
from common.solvers.statistics import CalibrationStatistics


def summed_norms(norms: Mapping[str, float]) -> dict[str, float]:
    """``norms`` summed over processes."""
    return distributed.sum_floats(norms)


def sum_statistics(statistics: Mapping[str, CalibrationStatistics]) -> None:
    """Replace each process's sums by the sums over every process, in place."""
    for stats in statistics.values():
        stats.reduce_(distributed.sum_)


def solve_shared(linears: Mapping[str, QuantLinear], cost: Callable[[str], float],
                 solve: Callable[[str], LayerRecord]) -> list[LayerRecord]:
    """``solve(name)`` for each linear on one process (assigned by ``cost``), its result given to every one."""
    owners = distributed.assign_by_cost({name: cost(name) for name in linears})
    return [_share(linear, solve(name) if owners[name] == distributed.rank() else None, owners[name])
            for name, linear in linears.items()]


def _share(linear: QuantLinear, record: LayerRecord | None, owner: int) -> LayerRecord:
    """Give every process the owner's quantized weight, grid and record."""
    if not distributed.active():
        return record
    with torch.no_grad():
        distributed.broadcast_(linear.weight.data, owner)
    grid = linear.weight_grid if owner == distributed.rank() else None
    grid, record = distributed.broadcast_object((grid.to("cpu") if grid is not None else None, record), owner)
    linear.weight_grid = grid.to(linear.weight.device) if grid is not None else None
    return record
