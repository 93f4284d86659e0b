"""Synthetic Llama checkpoints with real shapes and random weights, for measuring memory and time at scale.

``python -m common.bench.synthetic_llama --shape llama-2-7b --out DIR`` writes a Hugging Face checkpoint
folder: ``config.json``, float16 safetensors shards of at most ``--shard-gib`` each with their index, and the
embedded model's tokenizer (so the vocabulary is SmolLM2's 49152 tokens, whatever the shape). The weights are
seeded normal values (standard deviation 0.02; norm scales 1 ± 0.1), written one tensor at a time: the
model is never whole in memory. The numbers mean nothing; the shapes, file sizes and layout are real.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from common.files import atomic_write_json
from common.llama.loading import load_llama_tokenizer

SHAPES = {
    "toy": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4},
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
}
"""The sizes of TinyLlama-1.1B, Llama-2-7B and Llama-2-13B (their configurations' values), and a toy one."""
VOCAB = 49152
"""The embedded tokenizer's vocabulary."""


def shape_config(shape: str, layers: int | None = None) -> LlamaConfig:
    """The configuration of ``shape`` (a key of :data:`SHAPES`) with the embedded tokenizer's vocabulary; with
    ``layers``, its first ``layers`` decoder layers only (every block the same shape, so the same peak memory
    per block, in a smaller checkpoint)."""
    sizes = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       dtype="float16", architectures=["LlamaForCausalLM"], **sizes)


def write_checkpoint(shape: str, folder: Path, *, shard_gib: float = 2.0, seed: int = 0,
                     layers: int | None = None) -> Path:
    """Write the synthetic checkpoint of ``shape`` (its first ``layers`` layers, if given) into ``folder`` (see
    the module docstring); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape, layers)
    with init_empty_weights():
        names = {name: tuple(param.shape) for name, param in LlamaForCausalLM(config).named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard.clear()

    for name, size in names.items():
        if name.endswith("norm.weight"):
            tensor = 1 + 0.1 * (2 * torch.rand(size, generator=generator) - 1)
        else:
            tensor = 0.02 * torch.randn(size, generator=generator)
        shard[name] = tensor.to(torch.float16)
        if sum(t.nbytes for t in shard.values()) >= shard_gib * 2**30:
            flush()
    if shard:
        flush()
    count = len(files)
    renamed = {}
    for index, name in enumerate(files, start=1):
        final = f"model-{index:05d}-of-{count:05d}.safetensors"
        (folder / name).rename(folder / final)
        renamed[name] = final
    total = sum((folder / final).stat().st_size for final in renamed.values())
    atomic_write_json(folder / "model.safetensors.index.json", {
        "metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}})
    config.save_pretrained(folder)
    load_llama_tokenizer().save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint into")
    parser.add_argument("--shard-gib", type=float, default=2.0, help="largest shard, GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="only the first LAYERS decoder layers of the shape")
    args = parser.parse_args(argv)
    folder = write_checkpoint(args.shape, args.out, shard_gib=args.shard_gib, seed=args.seed, layers=args.layers)
    print(json.dumps({"folder": str(folder), "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
