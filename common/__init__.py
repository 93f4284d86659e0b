"""Shared library: GPTQ/GPTAQ layer solver, quantizers, Hadamard transforms, calibration engine."""
