"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"; kvablack/ddpo-pytorch),
ALGORITHMS.md §7.1: policy gradient with importance sampling and PPO clipping over the stored
denoising transitions of online samples, per-prompt advantage tracking.

Per trained transition ``x_t -> x_{t-1}`` of a sample with advantage ``A``::

    ratio = exp(log p_theta(x_{t-1} | x_t, c) - log p_old(x_{t-1} | x_t, c))     (per-element mean log-probs)
    loss  = max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range)),  A clamped to [-adv_clip, adv_clip]

Advantages: :class:`~visalign.algorithms.online.PerPromptStatTracker` (buffer 16, min_count 16;
the batch's statistics until a prompt has ``min_count`` rewards), or the whole batch's mean/std
(``per_prompt_stat_tracking=False``). Collection, rewards and Pareto selection are shared with
PRDP and GRPO (:mod:`visalign.algorithms.online`).
"""

from __future__ import annotations

import torch

from ..config import configclass, field
from ..training.objective import register_objective
from .online import OnlineObjective, OnlineOptions, PerPromptStatTracker, ppo_clip_loss


@configclass
class DDPOOptions(OnlineOptions):
    clip_range: float = field(1e-4, help="PPO ratio clip (for per-element mean log-probs)")
    adv_clip: float = field(5.0, help="advantages are clamped to [-adv_clip, adv_clip]")
    per_prompt_stat_tracking: bool = field(True, help="normalise rewards per prompt (else over the batch)")
    stat_buffer_size: int = field(16, help="rewards kept per prompt")
    stat_min_count: int = field(16, help="below this many rewards a prompt uses the batch's statistics")


@register_objective("ddpo")
class DDPO(OnlineObjective):
    Options = DDPOOptions

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options, reward)
        self.tracker = PerPromptStatTracker(getattr(self.options, "stat_buffer_size", 16),
                                            getattr(self.options, "stat_min_count", 16))

    def advantages(self, rollout) -> torch.Tensor:
        if self.options.per_prompt_stat_tracking:
            return self.tracker.update(rollout.prompts, rollout.rewards)
        rewards = rollout.rewards.float()
        return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)

    def prepare(self, rollout, generator):
        rollout.advantages = self.advantages(rollout)
        samples = rollout.selected.nonzero().flatten()
        steps = self.trained_steps(len(samples), generator)
        items = torch.stack([samples[:, None].expand_as(steps), steps], dim=-1).reshape(-1, 2)
        self.last["advantage_abs"] = float(rollout.advantages.abs().mean())
        return items[torch.randperm(items.shape[0], generator=generator)]

    def policy_terms(self, items):
        """Per-item PPO loss, ratio and the policy's step (for subclasses' extra terms)."""
        samples, steps = items[:, 0], items[:, 1]
        step = self.log_probs(samples, steps)
        old = self.rollout.log_probs[samples, steps].to(step.log_prob.device)
        advantages = self.rollout.advantages[samples]
        per_item, ratio = ppo_clip_loss(step.log_prob, old, advantages, self.options.clip_range,
                                        self.options.adv_clip)
        return per_item, ratio, step, old

    def item_loss(self, items):
        per_item, ratio, step, old = self.policy_terms(items)
        loss = per_item.mean()
        return loss, self.ppo_metrics(ratio, step.log_prob, old)

    def ppo_metrics(self, ratio, log_prob, old) -> dict[str, float]:
        ratio, log_prob = ratio.detach(), log_prob.detach()
        return {"approx_kl": float(0.5 * ((log_prob - old) ** 2).mean()),
                "clipfrac": float(((ratio - 1).abs() > self.options.clip_range).float().mean()),
                "ratio_mean": float(ratio.mean())}

    def state_dict(self):
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
