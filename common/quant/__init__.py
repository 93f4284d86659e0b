"""Quantizers and transforms: uniform fake quantizers, Hadamard transforms, the quantized linear layer."""
