"""How this process's heap hands memory back to the system (glibc on Linux; a no-op elsewhere).

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap``, returned to the
system as soon as it is freed; smaller ones come from the heap, whose freed space stays resident until it
is reused or trimmed. By default the threshold grows to the size of every freed mapping (up to 32 MiB), so
after the first large tensor is freed, tensors of up to 32 MiB — a calibration batch's activations — are
carved out of the heap and the freed ones keep the process's resident set at its high-water mark.
:func:`map_large_allocations` fixes the threshold, so every tensor above it is unmapped when freed.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Tensors of at least this many bytes get their own mapping once map_large_allocations() has run.
LARGE_ALLOCATION_BYTES = 1 << 20


def _load_glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_GLIBC = _load_glibc()
TUNABLE = _GLIBC is not None  # whether this process's heap is glibc's (the functions below act)


def release_freed_memory() -> None:
    """Hand memory the heap has freed back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def map_large_allocations(threshold_bytes: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Serve every allocation of at least ``threshold_bytes`` from its own mapping, unmapped when freed.

    Also trims the heap whenever its free top exceeds the threshold. Returns whether the setting took
    effect (glibc only). Affects allocations made afterwards, for the whole process.
    """
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    if _GLIBC is None:
        return False
    mapped = _GLIBC.mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    trimmed = _GLIBC.mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1
    return mapped and trimmed
