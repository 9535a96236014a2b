"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024, "PRDP: Proximal Reward
Difference Prediction for Large-Scale Reward Finetuning of Diffusion Models"), ALGORITHMS.md §5.

For two trajectories ``a``, ``b`` of the same prompt, the KL-regularised RL optimum satisfies
``r(a) - r(b) = beta [log(pi/pi_ref)(a) - log(pi/pi_ref)(b)]`` (the partition function cancels),
so the model is trained to *predict reward differences* from its own log-ratios, a supervised
regression instead of a policy gradient::

    l_t(x)   = log pi_theta(x_{t-1} | x_t, c) - log pi_old(x_{t-1} | x_t, c)      (per-element mean log-probs)
    pred     = T * (l_t(a) - l_t(b))               per_timestep form: one step t, scaled to the trajectory sum
             = (T / n) * sum_{t in S} (l_t(a) - l_t(b))    summed form: n = |S| trained steps of the pair
    target   = (r(a) - r(b)) / beta
    loss     = max((pred - target)^2, (pred_clip - target)^2)      pred_clip: the same with l clamped to
                                                                    [-clip_range, clip_range] (proximal update)
             + kl_weight * KL(step of theta || step of the pretrained model)          (optional, default off)

Online: ``pi_ref = pi_old`` is the snapshot that sampled the trajectories; every
``refresh_every`` optimisation steps the objective resamples with the current weights (a new
snapshot). Pairs are all pairs within each prompt's group (``group_size (group_size - 1) / 2``);
the same step index is trained for both members of a pair.

Deviations / choices (no official code): the per-step decomposition, the clip form and the
defaults (``beta 10``, ``clip_range 1e-4``) come from a secondary summary and are flagged [S/R] in
ALGORITHMS.md §5. ``beta`` and ``clip_range`` are on the per-element-mean log-prob scale. The
summed form evaluates all trained steps of a pair in one batched call (memory grows with
``timestep_fraction * num_inference_steps``). With ``pareto: true`` a pair is kept when at least
one member is on its group's Pareto front.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import register_objective
from .online import OnlineObjective, OnlineOptions, gaussian_step_kl

FORMS = ("per_timestep", "summed")


def rdp_loss(l_a: Tensor, l_b: Tensor, reward_a: Tensor, reward_b: Tensor, beta: float, num_steps: int,
             clip_range: float | None = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """The (proximal) reward-difference-prediction loss per pair.

    Args:
        l_a, l_b: log-ratios ``log pi_theta - log pi_old`` of the trained steps, ``[P, n]`` (``n = 1``:
            the per-timestep form).
        reward_a, reward_b: ``[P]``.
        num_steps: ``T``, the trajectory's number of steps (the sum over ``n`` steps is scaled by ``T/n``).
        clip_range: clamp of each ``l`` in the clipped branch; ``None`` turns clipping off.
    Returns:
        ``(loss [P], pred [P], target [P])``.
    """
    scale = num_steps / l_a.shape[1]
    target = (reward_a - reward_b).to(l_a) / beta
    pred = scale * (l_a - l_b).sum(dim=1)
    loss = (pred - target) ** 2
    if clip_range is not None:
        pred_clip = scale * (l_a.clamp(-clip_range, clip_range) - l_b.clamp(-clip_range, clip_range)).sum(dim=1)
        loss = torch.maximum(loss, (pred_clip - target) ** 2)
    return loss, pred, target


def group_pairs(group_size: int, num_groups: int, keep: Tensor | None = None) -> Tensor:
    """All pairs ``(a, b)``, ``a < b``, within each group of ``group_size`` adjacent samples →
    ``[P, 2]``; with ``keep [B]``, only pairs with at least one kept member."""
    first, second = torch.triu_indices(group_size, group_size, offset=1)
    offsets = (torch.arange(num_groups) * group_size)[:, None]
    pairs = torch.stack([(offsets + first).reshape(-1), (offsets + second).reshape(-1)], dim=1)
    if keep is not None:
        pairs = pairs[keep[pairs[:, 0]] | keep[pairs[:, 1]]]
    return pairs


@configclass
class PRDPOptions(OnlineOptions):
    beta: float = field(10.0, help="KL strength: the regression target is (r_a - r_b) / beta")
    clip_range: float = field(1e-4, help="proximal clip of each log-ratio (per-element mean log-probs); 0: off")
    form: str = field("per_timestep", help="per_timestep (one step per pair item, scaled by T) or summed "
                                           "(all trained steps of a pair in one item)")
    kl_weight: float = field(0.0, help="weight of the KL of each step to the pretrained model (0: off)")


@register_objective("prdp")
class PRDP(OnlineObjective):
    Options = PRDPOptions
    needs_reference = True  # per instance: only with kl_weight > 0

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options, reward)
        if self.options.form not in FORMS:
            raise ConfigError(f"options.form must be one of {FORMS}, got {self.options.form!r}")
        if self.options.beta <= 0:
            raise ConfigError(f"options.beta must be positive, got {self.options.beta}")
        self.needs_reference = self.options.kl_weight > 0

    def prepare(self, rollout, generator):
        o = self.options
        pairs = group_pairs(o.group_size, len(rollout) // o.group_size, rollout.selected if o.pareto else None)
        steps = self.trained_steps(pairs.shape[0], generator)  # [P, n]
        if o.form == "summed":
            items = torch.cat([pairs, steps], dim=1)
        else:
            n = steps.shape[1]
            items = torch.cat([pairs.repeat_interleave(n, dim=0), steps.reshape(-1, 1)], dim=1)
        self.last["pairs"] = float(pairs.shape[0])
        return items[torch.randperm(items.shape[0], generator=generator)]

    def item_loss(self, items):
        o = self.options
        rollout = self.rollout
        a, b, steps = items[:, 0], items[:, 1], items[:, 2:]
        count, n = steps.shape
        samples = torch.cat([a.repeat_interleave(n), b.repeat_interleave(n)])
        step_index = torch.cat([steps.reshape(-1), steps.reshape(-1)])
        step = self.log_probs(samples, step_index)
        old = rollout.log_probs[samples, step_index].to(step.log_prob.device)
        log_ratio = step.log_prob - old
        l_a, l_b = log_ratio[: count * n].view(count, n), log_ratio[count * n :].view(count, n)
        rewards = rollout.rewards.to(log_ratio.device)
        per_pair, pred, target = rdp_loss(l_a, l_b, rewards[a], rewards[b], o.beta, rollout.num_steps,
                                          o.clip_range if o.clip_range > 0 else None)
        loss = per_pair.mean()
        pred, target = pred.detach(), target.detach()
        informative = target != 0
        metrics = {
            "rdp_loss": float(loss.detach()),
            "pred_abs": float(pred.abs().mean()),
            "target_abs": float(target.abs().mean()),
            "sign_agreement": float((pred[informative].sign() == target[informative].sign()).float().mean())
            if informative.any() else float("nan"),
            "clipfrac": float((log_ratio.detach().abs() > o.clip_range).float().mean()),
            "approx_kl": float(0.5 * (log_ratio.detach() ** 2).mean()),
        }
        if o.kl_weight > 0:
            reference = self.log_probs(samples, step_index, reference=True)
            kl = gaussian_step_kl(step.mean, reference.mean.detach(), step.std.detach()).mean()
            loss = loss + o.kl_weight * kl
            metrics["kl"] = float(kl.detach())
        return loss, metrics
