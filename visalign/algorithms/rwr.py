"""Flow-RWR: reward-weighted flow matching (Liu et al. 2025, "Improving Video Generation with
Human Feedback", §4; ALGORITHMS.md §2.2)::

    loss = mean_i  w_i * mse(v_theta(x_s, s, y), eps - x0)      w_i = exp(r_i / temperature)

with the Generator's own target, so it is reward-weighted regression for diffusion models too.
No reference model. The paper drops the ``(1-s)^2`` factor (we do too) and uses ``exp(r)``
literally (``temperature=1``, ``normalize=none``).

Deviation (opt-in, ``normalize="batch"``): ``exp(r)`` is unbounded, so one high-reward sample
can dominate a batch or overflow. ``normalize="batch"`` replaces the weights by
``softmax(r / temperature) * N`` over the (local) batch of ``N`` images: the same relative
weights, mean weight 1, computed in log space. This is not in the paper.

Data: ``ranking`` records (``images`` with one reward ``score`` each), as written by
:func:`visalign.algorithms.preference_data.build_preference_data` (``rankings.jsonl``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_latents, denoising_loss, prompt_cond, prompt_dropout_mask

NORMALIZE = ("none", "batch")


def rwr_weights(rewards: Tensor, temperature: float = 1.0, normalize: str = "none") -> Tensor:
    """Per-sample weights ``exp(r / T)`` or, with ``normalize="batch"``, ``softmax(r / T) * N``."""
    logits = rewards.float() / temperature
    if normalize == "none":
        weights = logits.exp()
        if not torch.isfinite(weights).all():
            raise FloatingPointError(f"exp(reward / {temperature}) overflows (max reward {rewards.max().item():.4g}): "
                                     "raise options.temperature or use options.normalize=batch")
        return weights
    if normalize == "batch":
        return torch.softmax(logits, dim=0) * logits.numel()
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


@configclass
class RWROptions:
    temperature: float = field(1.0, help="weights exp(reward / temperature); the paper uses 1")
    normalize: str = field("none", help="none (the paper: exp(r)) or batch (softmax over the batch x N; a deviation)")
    prompt_dropout: float = field(0.0, help="probability of training a sample with the empty prompt")


@register_objective("rwr")
class RewardWeightedRegression(Objective):
    """Flow-RWR (and reward-weighted denoising for diffusion models) on reward-scored images."""

    data_kinds = ("ranking",)
    Options = RWROptions
    needs_reference = False

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        if self.options.normalize not in NORMALIZE:
            raise ConfigError(f"options.normalize must be one of {NORMALIZE}, got {self.options.normalize!r}")
        if self.options.temperature <= 0:
            raise ConfigError(f"options.temperature must be positive, got {self.options.temperature}")

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        mask = batch["mask"]  # [B, K]: real images (records may hold fewer than K)
        groups = batch["images"].shape[1]
        flat = {
            "images": batch["images"][mask],
            "prompts": [p for p, row in zip(batch["prompts"], mask.tolist()) for keep in row if keep],
        }
        for key in ("original_sizes", "crop_top_lefts"):
            if batch.get(key) is not None:
                flat[key] = batch[key].repeat_interleave(groups, dim=0)[mask.flatten()]
        rewards = batch["scores"][mask].to(gen.device)
        if batch.get("cached") is not None:
            cached = batch["cached"]
            flat["cached"] = {"images": cached["images"][mask],
                              "cond": cached["cond"].repeat_interleave(groups)[mask.flatten().to(cached["images"].device)]}
        (latents,) = batch_latents(gen, flat, ("images",), rng)
        drop = prompt_dropout_mask(len(latents), self.options.prompt_dropout, rng)
        cond = prompt_cond(gen, flat, drop)
        weights = rwr_weights(rewards, self.options.temperature, self.options.normalize)
        mse = denoising_loss(gen, latents, cond, rng)
        loss = (weights.to(mse) * mse).mean()
        metrics = {"loss": loss.detach().item(), "mse": mse.detach().mean().item(),
                   "reward_mean": rewards.float().mean().item(), "weight_max": weights.max().item()}
        return loss, metrics
