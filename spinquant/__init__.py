"""SpinQuant learned rotations + GPTQ/GPTAQ (not built yet: see the issue tracker)."""
