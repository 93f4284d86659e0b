"""The benchmarks' one timing convention and their shared inputs.

A time is the *best* (smallest) wall time of ``repeats`` calls after one warm-up call, the device
synchronised around each call: the smallest time is the one least disturbed by the rest of the machine.
Comparisons between two implementations alternate their calls round by round, so a drifting machine slows
both alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from common.profile import synchronize
from common.rules import check_positive

T = TypeVar("T")


def timed(call: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Wall time in seconds of one ``call()`` (the device synchronised before and after), and its result."""
    synchronize(device)
    began = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - began, result


def best_seconds(call: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """Best wall time in seconds of ``call()`` over ``repeats`` calls after one warm-up, and its last result."""
    best, results = best_alternating({"call": call}, device, repeats)
    return best["call"], results["call"]


def best_alternating(calls: dict[str, Callable[[], T]], device: torch.device, repeats: int
                     ) -> tuple[dict[str, float], dict[str, T]]:
    """Best wall time of each of ``calls`` over ``repeats`` rounds, each round calling every one in turn (after
    one warm-up call each); returns ``{name: seconds}`` and ``{name: last result}``."""
    check_positive("repeats", repeats)
    results = {name: call() for name, call in calls.items()}
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            seconds, results[name] = timed(call, device)
            best[name] = min(best[name], seconds)
    return best, results


def seeded_problem(rows: int, columns: int, device: torch.device, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer problem: weight [rows, columns], ``H`` and ``D`` [columns, columns] from 2·columns tokens."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=g)
    x_full = torch.randn(2 * columns, columns, generator=g)
    x_quant = x_full + 0.1 * torch.randn(2 * columns, columns, generator=g)
    hessian = 2 / x_quant.shape[0] * x_quant.T @ x_quant
    drift = 2 / x_quant.shape[0] * (x_full - x_quant).T @ x_quant
    return weight.to(device), hessian.to(device), drift.to(device)


def parse_shape(text: str) -> tuple[int, int]:
    """``"ROWSxCOLUMNS"`` -> (rows, columns); an argparse error otherwise."""
    try:
        rows, columns = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes ROWSxCOLUMNS items such as 4096x4096, got {text!r}") from None
    return rows, columns
