"""The layer solvers: one linear layer's fake-quantized weight from its calibration statistics.

* :mod:`~common.solvers.statistics`: ``H`` and ``D`` streamed from a layer's inputs;
* :mod:`~common.solvers.column_loop`: the column-by-column loop every method shares (GPTQ's algorithm with
  lazy block updates and GPTAQ's extra term), its checks, damping, ``act_order`` and groups;
* :mod:`~common.solvers.gptq`, :mod:`~common.solvers.gptaq`, :mod:`~common.solvers.qep`,
  :mod:`~common.solvers.qronos`: one module per method, each its derivation, its start of the column loop and
  ``solve(W, H, D, config, *, name)``;
* :mod:`~common.solvers.references`: each method's definition in float64, the reference of the tests.
"""
