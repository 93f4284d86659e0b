"""Handing memory back to the operating system (glibc on Linux; elsewhere these do nothing).

* :func:`release_freed_memory`: what the allocator has freed but still holds (``malloc_trim``).
* :func:`drop_pages`: the pages of a live CPU tensor whose values are kept elsewhere (``madvise``
  ``MADV_DONTNEED``), for a while; the caller writes the values back before anything reads them.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Hand memory the allocator has freed back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def drop_pages(tensor: torch.Tensor) -> int:
    """Give the whole memory pages inside ``tensor``'s bytes back to the system; returns the bytes dropped.

    The tensor stays allocated, but its contents are lost: the pages read back as zeros (anonymous memory,
    e.g. the allocator's) or as the mapped file's bytes (a checkpoint opened with ``mmap``) until written.
    Only pages that lie entirely inside the tensor are dropped, so neighbouring data is untouched. Works for
    contiguous CPU tensors on Linux; returns 0 (nothing dropped) otherwise.
    """
    if _LIBC is None or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.nbytes == 0:
        return 0
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= first:
        return 0
    if _LIBC.madvise(first, end - first, _MADV_DONTNEED) != 0:
        return 0
    return end - first
