"""Dropping a live tensor's pages: only whole pages inside it, anonymous memory reads back as zeros, a
memory-mapped checkpoint's tensor as the file's bytes."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.memory import drop_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
PAGE_FLOATS = mmap.PAGESIZE // 4


def test_only_whole_pages_inside_the_tensor_are_dropped():
    backing = torch.ones(64 * PAGE_FLOATS)
    inner = backing[PAGE_FLOATS // 2 : 40 * PAGE_FLOATS + 7]  # starts and ends inside a page
    start, end = inner.data_ptr(), inner.data_ptr() + inner.nbytes
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    assert drop_pages(inner) == last - first >= 38 * mmap.PAGESIZE
    zero_from, zero_to = (first - backing.data_ptr()) // 4, (last - backing.data_ptr()) // 4
    assert torch.all(backing[:zero_from] == 1) and torch.all(backing[zero_to:] == 1)
    assert torch.all(backing[zero_from:zero_to] == 0)
    inner.fill_(3)  # the memory is still the tensor's
    assert torch.all(backing[PAGE_FLOATS // 2 : 40 * PAGE_FLOATS + 7] == 3)


def test_a_memory_mapped_tensor_reads_back_the_file(tmp_path: Path):
    save_file({"w": torch.full((32 * PAGE_FLOATS,), 5.0)}, tmp_path / "w.safetensors")
    weight = load_file(tmp_path / "w.safetensors")["w"]
    weight.mul_(2)  # private copies of the file's pages
    assert drop_pages(weight) > 0
    middle = weight[4 * PAGE_FLOATS : 28 * PAGE_FLOATS]
    assert torch.all(middle == 5.0)


def test_what_cannot_be_dropped_is_left_alone():
    assert drop_pages(torch.ones(10)) == 0  # inside one page
    assert drop_pages(torch.ones(64, 4 * PAGE_FLOATS).T) == 0  # not contiguous
    assert drop_pages(torch.empty(0)) == 0
