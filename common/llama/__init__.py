"""Llama-family model handling shared by fake_quant (QuaRot) and spinquant (SpinQuant)."""
