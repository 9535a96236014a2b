"""Supervised fine-tuning: the plain denoising / flow-matching loss.

``L = mean_b mse(f_theta(x_t, t, c), target(x0, eps, t))`` with the Generator's family target
(noise, v, or velocity ``eps - x0``), ``t`` from the Generator's training distribution. It
pretrains the testbed's base models and is the SFT baseline of every preference method: on
pair data it trains on the winners.

Prompt dropout (replace the prompt by "" with probability ``prompt_dropout``) trains the
unconditional branch that classifier-free guidance needs.
"""

from __future__ import annotations

import torch

from ..config import configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_latents, denoising_loss, prompt_cond, prompt_dropout_mask


@configclass
class SFTOptions:
    prompt_dropout: float = field(0.0, help="probability of training a sample with the empty prompt (CFG)")


@register_objective("sft")
class SFT(Objective):
    """Denoising / flow-matching regression on captioned images (or the winners of pairs)."""

    data_kinds = ("caption", "pair")
    Options = SFTOptions
    needs_reference = False

    def loss(self, batch: dict, rng: torch.Generator):
        key = "images" if "images" in batch else "winner"
        (latents,) = batch_latents(self.generator, batch, (key,), rng)
        drop = prompt_dropout_mask(len(batch["prompts"]), self.options.prompt_dropout, rng)
        cond = prompt_cond(self.generator, batch, drop)
        loss = denoising_loss(self.generator, latents, cond, rng).mean()
        return loss, {"loss": loss.detach().item()}
