"""SpinQuant: learned rotations (Cayley SGD on the orthogonal group) + GPTQ/GPTAQ for Llama models."""
