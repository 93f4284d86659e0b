"""What a blockwise calibration holds in memory, as a formula of a Llama model's shapes and the calibration size.

:func:`calibration_bytes` states each term of the engine's resident set while a block is calibrated (see
:mod:`common.engine.model` and docs/engine.md); their sum is an upper bound (the kept inputs and the recorded
outputs of a block are not all alive at once). ``make bench-memory`` checks it against measured peaks, and
``make docs`` turns it into the README's table for the paper's models (:data:`PAPER_MODELS`).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


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


def calibration_bytes(shape: ModelShape, tokens: int, value_bytes: int, *, full_precision_stream: bool = True
                      ) -> dict[str, int]:
    """Each term of the resident set while a block is calibrated (bytes), for ``tokens`` calibration tokens
    on this process, values of ``value_bytes`` bytes (the model's dtype; statistics and solves in float32).

    Terms: ``block`` (its weights), ``streams`` (both, or the quantized one alone), ``kept inputs`` (each
    group's full-precision input, for ``D``), ``recorded outputs`` (solved linears' outputs replayed by later
    passes), ``solve`` (``H``, ``D``, the Cholesky factor, its inverse and GPTAQ's ``P`` of the widest linear
    input, float32), ``rotation`` (one weight in float64 and its rotated copy, while a block is read).
    """
    h, i, k = shape.hidden, shape.intermediate, shape.kv_width
    widest = max(h, i)
    return {
        "block": value_bytes * shape.block_values,
        "streams": (2 if full_precision_stream else 1) * value_bytes * tokens * h,
        "kept inputs": value_bytes * tokens * (3 * h + i) if full_precision_stream else 0,
        "recorded outputs": value_bytes * tokens * (2 * h + 2 * k + 2 * i),
        "solve": 4 * 5 * widest * widest,
        "rotation": 3 * 8 * h * i,
    }


def placement(terms: dict[str, int], *, offload: bool) -> tuple[int, int]:
    """``(host bytes, device bytes)`` of :func:`calibration_bytes`' terms on a GPU run: with ``offload`` the
    streams, kept inputs and recorded outputs stay in host memory and the block is read there first; without
    it everything but the block being read is on the device."""
    activations = terms["streams"] + terms["kept inputs"] + terms["recorded outputs"]
    device = terms["block"] + terms["solve"] + (0 if offload else activations)
    host = terms["block"] + terms["rotation"] + (activations if offload else 0)
    return host, device


def paper_table() -> list[list[str]]:
    """Rows of the README's memory table: per paper model, its float16 size, this repo's host and GPU memory
    with ``--offload`` (upper bounds from :func:`calibration_bytes`, GPTAQ, float16 model), and the weights the
    two other designs keep in host memory."""
    rows = []
    for name, shape in PAPER_MODELS.items():
        terms = calibration_bytes(shape, PAPER_TOKENS, 2)
        host, device = placement(terms, offload=True)
        model = 2 * shape.parameters
        rows.append([name, f"{model / GIB:.0f}", f"{host / GIB:.0f}", f"{device / GIB:.1f}", f"{model / GIB:.0f}",
                     f"{2 * shape.block_values / GIB:.1f}"])
    return rows
