"""What a blockwise calibration holds in memory, as a formula of a Llama model's shapes and the calibration size.

:func:`calibration_bytes` states each term of the engine's resident set while a block is calibrated (see
:mod:`common.engine.model` and docs/engine.md) and :func:`peak_bytes` combines them: the block and the
activations stay for the whole block, while the statistics of a group, its solve and the rotation of a block
being read come one after another, so only the largest of those counts. The sum is an upper bound (a block's
kept inputs and recorded outputs are not all alive at once) and leaves out the process itself (Python, torch
and transformers: about 1 GiB). ``make bench-memory`` checks it against measured peaks, and ``make docs``
turns it into the README's table for the paper's models (:data:`PAPER_MODELS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.llama.rotation import ROTATION_SLICE_BYTES
from common.solvers.statistics import SUM_ROWS

GIB = 2**30
ONE_AT_A_TIME = ("reading", "statistics", "solve")
"""Phases of a block that are never resident together (each term holds the block's weights it needs)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a Llama model's memory."""

    hidden: int
    intermediate: int
    layers: int
    kv_width: int
    """Key/value heads × head dimension."""
    vocab: int

    @property
    def block_values(self) -> int:
        """Parameters of one decoder block (the norms' are negligible)."""
        h, i, k = self.hidden, self.intermediate, self.kv_width
        return 2 * h * h + 2 * h * k + 3 * h * i

    @property
    def parameters(self) -> int:
        return self.layers * self.block_values + 2 * self.vocab * self.hidden


PAPER_MODELS = {
    "Llama-3-8B": ModelShape(hidden=4096, intermediate=14336, layers=32, kv_width=1024, vocab=128256),
    "Llama-3-70B": ModelShape(hidden=8192, intermediate=28672, layers=80, kv_width=1024, vocab=128256),
    "Llama-3.1-405B": ModelShape(hidden=16384, intermediate=53248, layers=126, kv_width=1024, vocab=128256),
}
"""The configurations' sizes of the paper's largest models."""
PAPER_TOKENS = 128 * 2048
"""The paper's calibration: 128 windows of 2048 tokens."""


def calibration_bytes(shape: ModelShape, tokens: int, value_bytes: int, *, full_precision_stream: bool = True,
                      resident_only: bool = False) -> dict[str, int]:
    """Each term of the resident set while a block is calibrated (bytes), for ``tokens`` calibration tokens
    on this process and values of ``value_bytes`` bytes (the calibration's dtype).

    Terms held for the whole block: ``streams`` (both, or the quantized one alone), ``kept inputs`` (each
    group's full-precision input, for ``D``), ``recorded outputs`` (solved linears' outputs replayed by later
    passes). Phases, one at a time (:data:`ONE_AT_A_TIME`), with ``n`` the widest linear input (down_proj's,
    the MLP size ``i``): ``reading`` (the block, a float64 slice of one weight with the copies its rotation
    makes, the residual rotation and the float64 factor ``H_{i/2}`` of the online Hadamard at worst),
    ``statistics`` (the float64 sums of ``H`` and ``D``, and the weights the pass reads),
    ``solve`` (``3¼`` float32 ``n × n`` matrices at most: ``D`` handed over, the Cholesky factor and its
    inverse with a quarter-size product, then ``P`` written over ``D``; the weight, its float32 working copy
    and the result). With ``resident_only`` (the CPU: :class:`common.weight_files.ResidentOnly`) the
    statistics of down_proj hold the MLP's two other weights and the sums live in mapped files, of which a
    slice of rows is resident at a time, and its solve holds down_proj's weight alone; otherwise the whole
    block and the sums stay.
    """
    h, i, k = shape.hidden, shape.intermediate, shape.kv_width
    n = max(h, i)
    sums = 2 if full_precision_stream else 1
    block = value_bytes * shape.block_values
    resident_sums = sums * 8 * SUM_ROWS * n if resident_only else sums * 8 * n * n
    return {
        "streams": sums * value_bytes * tokens * h,
        "kept inputs": value_bytes * tokens * (3 * h + i) if full_precision_stream else 0,
        "recorded outputs": value_bytes * tokens * (2 * h + 2 * k + 2 * i),
        "reading": block + 8 * h * h + 8 * i * i // 4 + 5 * ROTATION_SLICE_BYTES,
        "statistics": (2 * value_bytes * h * i if resident_only else block) + resident_sums,
        "solve": (value_bytes * h * i if resident_only else block) + 13 * n * n + 2 * 4 * h * i,
    }


def peak_bytes(terms: dict[str, int]) -> int:
    """The resident set's upper bound: every term, but only the largest of :data:`ONE_AT_A_TIME`."""
    return (sum(value for name, value in terms.items() if name not in ONE_AT_A_TIME)
            + max(terms[name] for name in ONE_AT_A_TIME))


def placement(terms: dict[str, int], *, offload: bool) -> tuple[int, int]:
    """``(host bytes, device bytes)`` of :func:`calibration_bytes`' terms (without ``resident_only``) on a GPU
    run: with ``offload`` the streams, kept inputs and recorded outputs stay in host memory; a block is read
    and rotated in host memory either way."""
    activations = terms["streams"] + terms["kept inputs"] + terms["recorded outputs"]
    device = max(terms["statistics"], terms["solve"]) + (0 if offload else activations)
    host = terms["reading"] + (activations if offload else 0)
    return host, device


def paper_rows() -> list[list[str]]:
    """Rows of the README's memory table: per paper model, its float16 size, this repo's host and GPU memory
    with ``--offload`` (upper bounds from :func:`calibration_bytes`, GPTAQ, float16 model, 128 × 2048 tokens),
    and the weights each design keeps in host memory: the whole model (the official code) or one block
    (this repo; GPTQModel, which reads one layer at a time from the shards)."""
    rows = []
    for name, shape in PAPER_MODELS.items():
        host, device = placement(calibration_bytes(shape, PAPER_TOKENS, 2), offload=True)
        rows.append([name, f"{2 * shape.parameters / GIB:.0f}", f"{host / GIB:.0f}", f"{device / GIB:.1f}",
                     f"{2 * shape.parameters / GIB:.0f}", f"{2 * shape.block_values / GIB:.1f}"])
    return rows
