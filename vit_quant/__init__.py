"""DeiT / EVA vision transformers with GPTQ/GPTAQ."""
