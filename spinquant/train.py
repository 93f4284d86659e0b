"""Learning ``R1`` and ``R2`` (SpinQuant): Cayley SGD on the language-model loss of the fake-quantized model.

The model is made ready by :func:`spinquant.rotation.prepare_model` and given its activation quantizers (the
run's activation bits and clip ratio). During training:

* the model's own weights are frozen; the only parameters are ``R1`` and the per-layer ``R2``, updated by
  :class:`spinquant.cayley.CayleySGD` with a cosine learning-rate decay to zero;
* every activation (and KV-cache) quantizer runs with a straight-through estimator: the forward pass is
  quantized, the backward pass treats the rounding as the identity (as SpinQuant's reference code does);
* each step rotates the decoder weights with :func:`common.llama.rotation.rotated_weights`, the function that
  later fuses the trained rotation, so the trained and the fused model compute the same function. The
  embedding and ``lm_head`` weights are not rotated: the embedding output is multiplied by ``R1`` and the
  final hidden state by ``R1ᵀ`` before ``lm_head``, the same products without two vocabulary-sized matmuls;
* optionally (``w_bits < 16``) the rotated decoder weights are round-to-nearest fake-quantized, also with
  a straight-through estimator. SpinQuant trains with 16-bit weights when GPTQ quantizes them afterwards.

Batches are drawn from the training windows by a seeded permutation per epoch, a function of the step,
so a run resumed from a checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from common.llama.rotation import LlamaShape, rotated_weights
from common.quant.quantizers import FULL_PRECISION_BITS, ActivationQuantizer, check_grid_bits, rtn_quantize_weight
from common.rules import check_positive
from spinquant.cayley import CayleySGD
from spinquant.rotation import SpinRotation, save_rotation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSettings:
    """How the rotations are learned.

    Attributes:
        steps: optimizer steps in all (a resumed run counts the steps already taken).
        lr: Cayley SGD's largest step at the start of the cosine decay.
        momentum: Cayley SGD's momentum.
        batch_size: windows per step.
        micro_batch_size: windows per forward/backward (gradients are accumulated; memory, not results).
        seed: seed of the batch order.
        w_bits: RTN weight bits during training (16 = full-precision weights).
        w_asym: asymmetric RTN grid (when ``w_bits < 16``).
        checkpoint_every: steps between checkpoints (and at the end).
        log_every: steps between loss log lines.
    """

    steps: int
    lr: float
    momentum: float = 0.0
    batch_size: int = 1
    micro_batch_size: int = 1
    seed: int = 0
    w_bits: int = FULL_PRECISION_BITS
    w_asym: bool = True
    checkpoint_every: int = 25
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size", "checkpoint_every", "log_every"):
            check_positive(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_grid_bits(self.w_bits, not self.w_asym, "w_bits", "w_asym=False")


def batch_indices(n_windows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Window indices of ``step``'s batch: consecutive slices of one seeded permutation per epoch."""
    per_epoch = n_windows // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {n_windows} training windows")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """``lr · ½ (1 + cos(π · step / steps))``: ``lr`` at step 0, zero after the last step."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


@contextmanager
def straight_through(model: nn.Module) -> Iterator[None]:
    """Switch every activation quantizer of ``model`` to its straight-through estimator, then back."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    before = [q.straight_through for q in quantizers]
    for quantizer in quantizers:
        quantizer.straight_through = True
    try:
        yield
    finally:
        for quantizer, value in zip(quantizers, before, strict=True):
            quantizer.straight_through = value


class RotationTrainer:
    """Computes the loss of a model under given ``R1``/``R2`` and trains them.

    Args:
        model: a model made ready by :func:`spinquant.rotation.prepare_model`, quantizers added; its
            parameters are frozen here.
        shape: the model's sizes.
        settings: the training settings.
    """

    def __init__(self, model: LlamaForCausalLM, shape: LlamaShape, settings: TrainingSettings) -> None:
        self.model = model.requires_grad_(False)
        self.shape = shape
        self.settings = settings
        self.weights = {name: p for name, p in model.named_parameters() if name.startswith("model.layers.")}
        self.quantized_weights = {
            f"model.layers.{i}.{name}.weight" for i in range(shape.num_layers)
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        }

    def _decoder_parameters(self, r1: torch.Tensor, r2: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rotated decoder weights ``{name relative to model.model: tensor}`` in the model's dtype."""
        dtype = r1.dtype
        weights = {name: w.to(dtype) for name, w in self.weights.items()}
        rotated = rotated_weights(weights, self.shape, residual=r1, heads=r2, embeddings=False)
        if self.settings.w_bits < FULL_PRECISION_BITS:
            for name in self.quantized_weights:
                w = rotated[name]
                q = rtn_quantize_weight(w.detach(), bits=self.settings.w_bits, sym=not self.settings.w_asym)
                rotated[name] = w + (q - w).detach()
        model_dtype = next(iter(self.weights.values())).dtype
        return {name.removeprefix("model."): value.to(model_dtype) for name, value in rotated.items()}

    def loss(self, r1: torch.Tensor, r2: Sequence[torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy (nats) of the rotated, fake-quantized model on ``input_ids`` [b, t]."""
        decoder = self.model.model
        parameters = self._decoder_parameters(r1, r2)
        embeddings = decoder.embed_tokens(input_ids)
        embeddings = (embeddings.to(r1.dtype) @ r1).to(embeddings.dtype)
        hidden = functional_call(decoder, parameters, args=(), kwargs={"inputs_embeds": embeddings,
                                                                       "use_cache": False}).last_hidden_state
        hidden = (hidden.to(r1.dtype) @ r1.T).to(hidden.dtype)
        logits = self.model.lm_head(hidden[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    @torch.no_grad()
    def mean_loss(self, rotation: SpinRotation, windows: torch.Tensor, *, device: torch.device) -> float:
        """The loss of the fake-quantized model rotated by ``rotation``, averaged over ``windows`` [n, seqlen]."""
        self.model.to(device)
        r1 = rotation.r1.to(device=device, dtype=torch.float32)
        r2 = [r.to(device=device, dtype=torch.float32) for r in rotation.r2]
        total = sum(self.loss(r1, r2, micro.to(device)).item() * len(micro)
                    for micro in windows.split(self.settings.micro_batch_size))
        return total / len(windows)

    def train(
        self,
        windows: torch.Tensor,
        rotation: SpinRotation,
        *,
        device: torch.device,
        checkpoint: Path | None = None,
        checkpoint_settings: dict[str, Any] | None = None,
        until: int | None = None,
        progress: bool = True,
    ) -> SpinRotation:
        """Continue training ``rotation`` from its ``step`` to ``settings.steps`` on ``windows`` [n, seqlen].

        Writes ``checkpoint`` (see :func:`spinquant.rotation.save_rotation`) every ``checkpoint_every`` steps
        and when it stops. ``until`` stops after that many steps in all (a time-boxed part of the schedule;
        the learning rate still follows ``settings.steps``). Returns the rotation (float64 matrices, losses,
        momentum) as it stands after the last step.
        """
        s = self.settings
        stop = s.steps if until is None else min(until, s.steps)
        self.model.to(device)
        r1 = nn.Parameter(rotation.r1.to(device=device, dtype=torch.float32))
        r2 = [nn.Parameter(r.to(device=device, dtype=torch.float32)) for r in rotation.r2]
        keys = ["R1", *(f"R2.{i}" for i in range(len(r2)))]
        parameters = dict(zip(keys, [r1, *r2], strict=True))
        masters = rotation.tensors()
        optimizer = CayleySGD(parameters.values(), lr=s.lr, momentum=s.momentum)
        for key, param in parameters.items():
            optimizer.state[param]["master"] = masters[key].to(device=device, dtype=torch.float64)
            buffer = rotation.momentum.get(key)
            optimizer.state[param]["momentum_buffer"] = (
                torch.zeros_like(optimizer.state[param]["master"]) if buffer is None
                else buffer.to(device=device, dtype=torch.float64)
            )
        losses = list(rotation.losses)
        bar = tqdm(range(rotation.step, stop), desc="rotation training", disable=not progress,
                   initial=rotation.step, total=s.steps)
        with straight_through(self.model):
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(s.lr, step, s.steps)
                optimizer.zero_grad(set_to_none=True)
                batch = windows[batch_indices(len(windows), s.batch_size, step, s.seed)]
                total = 0.0
                for micro in batch.split(s.micro_batch_size):
                    loss = self.loss(r1, r2, micro.to(device)) * (len(micro) / len(batch))
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                losses.append(total)
                bar.set_postfix(loss=f"{total:.4f}")
                if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
                    window = losses[-s.log_every:]
                    logger.info("rotation step %d/%d: loss %.4f (mean of last %d: %.4f), lr %.3g", step + 1,
                                s.steps, total, len(window), sum(window) / len(window), optimizer.param_groups[0]["lr"])
                rotation = SpinRotation(
                    r1=optimizer.state[r1]["master"].cpu(),
                    r2=[optimizer.state[r]["master"].cpu() for r in r2],
                    step=step + 1,
                    losses=list(losses),
                    momentum={k: optimizer.state[p]["momentum_buffer"].cpu() for k, p in parameters.items()},
                )
                if checkpoint is not None and ((step + 1) % s.checkpoint_every == 0 or step + 1 == stop):
                    save_rotation(checkpoint, rotation, self.shape, checkpoint_settings or {})
        return rotation
