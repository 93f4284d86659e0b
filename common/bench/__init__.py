"""Benchmarks and measurement tools, each a ``python -m common.bench.<name>`` command with a ``make`` target.

* :mod:`~common.bench.solver` (``make bench-solver``): every method's layer solve, as a ratio to GPTQ and to
  its FLOP floor;
* :mod:`~common.bench.revision` (``make bench-revision REV=...``): this checkout's solvers beside a git
  revision's, in one process, with bitwise comparison;
* :mod:`~common.bench.official` (``make bench-official``): our GPTQ and GPTAQ beside the official code's;
* :mod:`~common.bench.gptqmodel` (``make bench-gptqmodel``): weight-only calibration beside GPTQModel;
* :mod:`~common.bench.margins` (``make margins``): every numerics test's bound beside its measured value under
  several CPU kernel settings.

All times follow :mod:`~common.bench.timing` (best of ``--repeats`` after a warm-up).
"""
