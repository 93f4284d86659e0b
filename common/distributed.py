"""Data-parallel calibration across processes with ``torch.distributed`` (launched by ``torchrun``).

One process per device; ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous. Each
rank holds every ``world``-th calibration batch (and its part of both streams); the statistics of a group
(``H``, ``D``, their row count and the output norms) are summed across ranks before the solve; each linear of
a group is solved on one rank (a balanced assignment by cost) and its quantized weight broadcast. Only rank 0
evaluates, writes results, logs and shows progress bars (:func:`progress_bars`). Without ``WORLD_SIZE`` (or
with 1) nothing here does anything and a run is the single-process one.

Faults: a rank that raises leaves its message in the rendezvous store before it exits; its peers, whose next
collective then fails (the connection closes) or who wait on rank 0 (:func:`wait_for_main`), raise
:class:`DistributedError` with that message. Collectives time out after ``GPTAQ_DIST_TIMEOUT_S`` seconds
(default 1800), so a peer that disappears without a word cannot hang the others for ever.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

TIMEOUT_ENV_VAR = "GPTAQ_DIST_TIMEOUT_S"
_ERROR_KEY = "gptaq/error"
_POLL_SECONDS = 1.0
T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed (its message is included) or the ranks disagree on the run."""


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates, writes and reports."""
    return rank() == 0


def progress_bars() -> bool:
    """Whether this process shows progress bars (rank 0 only)."""
    return is_main()


def _environment_number(name: str, default: str, kind: type, low: float, what: str) -> int | float:
    """The environment variable ``name`` (``default`` when unset) as ``kind``, at least ``low``; else
    ``ValueError`` naming the variable."""
    text = os.environ.get(name, default)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be {what}, got {text!r}")
    return value


def requested_world_size() -> int:
    """``WORLD_SIZE`` from the launcher (1 without one)."""
    return _environment_number("WORLD_SIZE", "1", int, 1, "a positive integer (set by torchrun)")


def _local_rank() -> int:
    """``LOCAL_RANK`` from the launcher (0 without one)."""
    return _environment_number("LOCAL_RANK", "0", int, 0, "a non-negative integer (set by torchrun)")


def initialize(device_setting: str) -> bool:
    """Join the process group ``torchrun`` describes (NCCL for CUDA, gloo for the CPU); returns whether it did.

    On CUDA each rank takes ``cuda:<LOCAL_RANK>``. Non-main ranks stop logging below warnings and hide
    their progress bars.
    """
    if requested_world_size() <= 1 or active():
        return active()
    cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(_local_rank())
    seconds = _environment_number(TIMEOUT_ENV_VAR, "1800", float, 1, "a number of seconds, at least 1")
    timeout = timedelta(seconds=seconds)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    return True


def finalize(*, wait_for_peers: bool = False) -> None:
    """Leave the process group; with ``wait_for_peers``, only once every rank got here (a finished rank 0,
    which may host the rendezvous store, must not leave while its peers still read it)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and active():
            with _reporting_peer_failures():
                dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` for a CUDA run, else ``device`` unchanged."""
    if active() and device.type == "cuda":
        return torch.device("cuda", _local_rank())
    return device


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings as sorted JSON (what every rank must agree on)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_same_settings(settings: Mapping[str, Any]) -> None:
    """``DistributedError`` naming the ranks whose settings differ from rank 0's (before any work)."""
    if not active():
        return
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, settings_digest(settings))
    differ = [index for index, digest in enumerate(digests) if digest != digests[0]]
    if differ:
        raise DistributedError(f"ranks {differ} were started with other settings than rank 0 (settings digests "
                               f"{[digests[i][:12] for i in differ]} vs {digests[0][:12]}): launch every rank with "
                               f"the same config and flags")


def shard(items: Sequence[T], what: str = "calibration batches") -> list[T]:
    """This rank's items: every ``world``-th one, starting at its rank (all of them in one process)."""
    if not active():
        return list(items)
    if len(items) < world_size():
        raise ValueError(f"{len(items)} {what} cannot be shared by {world_size()} ranks: give at least one per "
                         f"rank (more samples or a smaller batch size)")
    return list(items[rank()::world_size()])


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a no-op in one process)."""
    if active():
        with _reporting_peer_failures():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_floats(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` summed key by key over the ranks (float64)."""
    if not active() or not values:
        return dict(values)
    keys = list(values)
    total = sum_(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device()))
    return dict(zip(keys, total.tolist(), strict=True))


def broadcast_(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``source``'s, in place."""
    if active():
        with _reporting_peer_failures():
            dist.broadcast(tensor, src=source)
    return tensor


def broadcast_object(value: Any, source: int) -> Any:
    """Rank ``source``'s ``value`` (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    with _reporting_peer_failures():
        dist.broadcast_object_list(box, src=source)
    return box[0]


def assign_by_cost(costs: Mapping[str, float]) -> dict[str, int]:
    """Each name to a rank so that the largest total cost per rank is small (largest first, to the least
    loaded rank; ties to the lowest rank): deterministic, the same on every rank."""
    loads = [(0.0, r) for r in range(world_size())]
    heapq.heapify(loads)
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, owner = heapq.heappop(loads)
        owners[name] = owner
        heapq.heappush(loads, (load + costs[name], owner))
    return owners


def barrier() -> None:
    """Every rank waits here until all have arrived (a no-op in one process)."""
    if active():
        with _reporting_peer_failures():
            dist.barrier()


def report_failure(error: BaseException) -> None:
    """Leave this rank's error in the rendezvous store for its peers (best effort), before it exits."""
    if not active() or isinstance(error, DistributedError):
        return
    try:
        _store().set(_ERROR_KEY, f"rank {rank()}: {type(error).__name__}: {error}")
    except Exception:  # the store may be gone with the failing peer; exiting is what matters
        pass


def wait_for_main(step: str) -> None:
    """Ranks other than 0 wait, without a time limit, until rank 0 says ``step`` is done (e.g. an evaluation
    that takes longer than a collective's timeout); a peer's failure ends the wait with its message."""
    if not active():
        return
    store, key = _store(), f"gptaq/done/{step}"
    if is_main():
        store.set(key, "1")
        return
    try:
        while not store.check([key]):
            if store.check([_ERROR_KEY]):
                raise DistributedError(store.get(_ERROR_KEY).decode())
            time.sleep(_POLL_SECONDS)
    except (RuntimeError, dist.DistStoreError) as error:
        raise DistributedError(f"rank {rank()} lost the rendezvous while waiting for rank 0: {error}") from None


@contextmanager
def _reporting_peer_failures() -> Iterator[None]:
    """Turn a collective that fails because a peer went away into that peer's own message."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as error:
        failure = _peer_failure()
        raise DistributedError(failure or f"rank {rank()}: a collective failed ({error})") from None


def _peer_failure() -> str | None:
    try:
        store = _store()
        store.set_timeout(timedelta(seconds=5))
        if store.check([_ERROR_KEY]):
            return store.get(_ERROR_KEY).decode()
        store.wait([_ERROR_KEY], timedelta(seconds=3))  # the failing rank may still be writing it
        return store.get(_ERROR_KEY).decode()
    except Exception:  # no message to be had: the caller reports what it saw
        return None


def _store() -> dist.Store:
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
