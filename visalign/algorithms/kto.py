"""Diffusion-KTO (Li et al., NeurIPS 2024; jacklishufan/diffusion-kto): alignment from binary
feedback (thumbs up / down per image), no pairs needed. ALGORITHMS.md §14.

Per image, with its own noise and timestep::

    g   = mse_ref - mse_theta                       # implicit reward (policy log-ratio up to scale)
    z0  = sg(clamp(mean of g over the global batch, min=0))     # all-reduced across ranks
    h   = sigmoid(beta * sgn * (g - z0))            # sgn = +1 desirable, -1 undesirable
    loss = mean(lambda_y * (1 - h))

This is the reference code's default ("none" offset mode, sigmoid value function). Data:
``feedback`` records (``label`` 1 good, 0 bad), or ``pair`` records split into a desirable
winner and an undesirable loser (the paper's Pick-a-Pic policy "gt_label_wi_l").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import Cond
from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_latents, per_sample_mse, prompt_cond, prompt_dropout_mask


def kto_reference_point(g: Tensor) -> Tensor:
    """``clamp(mean(g), min=0)`` over every rank's samples (all-reduced), detached."""
    g = g.detach().float()
    total = torch.stack([g.sum(), torch.tensor(float(g.numel()), device=g.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).clamp(min=0)


def kto_loss(policy_mse: Tensor, reference_mse: Tensor, desirable: Tensor, beta: float,
             lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0) -> tuple[Tensor, dict]:
    """Diffusion-KTO loss (mean) and its parts, from per-sample MSEs ``[B]`` and labels ``[B]`` (bool)."""
    g = reference_mse - policy_mse
    z0 = kto_reference_point(g)
    sign = desirable.to(g.dtype) * 2 - 1
    h = torch.sigmoid(beta * sign * (g - z0))
    weight = torch.where(desirable, torch.as_tensor(lambda_desirable, dtype=g.dtype, device=g.device),
                         torch.as_tensor(lambda_undesirable, dtype=g.dtype, device=g.device))
    loss = (weight * (1 - h)).mean()
    return loss, {"reference_point": z0, "implicit_reward": g.detach(), "value": h.detach()}


@configclass
class KTOOptions:
    beta: float = field(1000.0, help="sharpness of the value function (reference code default 1000)")
    lambda_desirable: float = field(1.0, help="weight of desirable (thumbs-up) samples")
    lambda_undesirable: float = field(1.0, help="weight of undesirable (thumbs-down) samples")
    prompt_dropout: float = field(0.0, help="probability of training a sample with the empty prompt")


@register_objective("kto")
class DiffusionKTO(Objective):
    """Diffusion-KTO on binary feedback (or on pairs as winner-good / loser-bad)."""

    data_kinds = ("feedback", "pair")
    Options = KTOOptions
    needs_reference = True

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        if self.options.beta <= 0:
            raise ConfigError(f"options.beta must be positive, got {self.options.beta}")

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        if "winner" in batch:
            winners, losers = batch_latents(gen, batch, ("winner", "loser"), rng)
            latents = torch.cat([winners, losers])
            desirable = torch.cat([torch.ones(len(winners)), torch.zeros(len(losers))]).bool()
            drop = prompt_dropout_mask(len(winners), self.options.prompt_dropout, rng)
            cond = prompt_cond(gen, batch, drop)
            cond = Cond.cat([cond, cond])
        else:
            (latents,) = batch_latents(gen, batch, ("images",), rng)
            desirable = batch["labels"] > 0.5
            drop = prompt_dropout_mask(len(latents), self.options.prompt_dropout, rng)
            cond = prompt_cond(gen, batch, drop)
        desirable = desirable.to(latents.device)
        noise = torch.randn(latents.shape, generator=rng, device=rng.device).to(latents)
        t = gen.sample_timesteps(latents.shape[0], generator=rng)
        x_t = gen.add_noise(latents, noise, t)
        target = gen.target(latents, noise, t)
        policy = per_sample_mse(gen.predict(x_t, t, cond), target)
        reference = per_sample_mse(gen.reference().predict(x_t, t, cond), target)
        loss, parts = kto_loss(policy, reference, desirable, self.options.beta, self.options.lambda_desirable,
                               self.options.lambda_undesirable)
        g = parts["implicit_reward"]
        metrics = {
            "loss": loss.detach().item(),
            "reference_point": parts["reference_point"].item(),
            "implicit_reward_desirable": _mean_where(g, desirable),
            "implicit_reward_undesirable": _mean_where(g, ~desirable),
            "mse_desirable": _mean_where(policy.detach(), desirable),
            "mse_undesirable": _mean_where(policy.detach(), ~desirable),
        }
        return loss, metrics


def _mean_where(values: Tensor, mask: Tensor) -> float:
    return values[mask].mean().item() if bool(mask.any()) else float("nan")
