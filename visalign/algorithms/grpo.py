"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL";
yifan123/flow_grpo), ALGORITHMS.md §7.2: group-relative advantages, PPO clipping, and a KL term
to the reference (pretrained) model, over the flow SDE's stored transitions.

Per prompt, ``group_size`` images; ``A = (r - mean_group) / (std + 1e-4)`` (``global_std``: the
std of the whole batch). Per trained transition::

    loss = max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range)) + beta_kl * KL
    KL   = mean over latent elements of ||mu_theta - mu_ref||^2 / (2 std^2)

``mu`` are the means of the step's Gaussian under the policy and the reference
(``Generator.reference()``: LoRA disabled, or the frozen copy of full fine-tuning), and ``std``
is **the step's own standard deviation** (``std_dev * sqrt(-dt)`` for the flow SDE), which makes
the term the exact KL between the two step Gaussians (per element). flow_grpo divides by
``std_dev^2`` without the ``-dt`` factor, so its ``beta_kl`` corresponds to ours times ``-dt``
(about 0.1 at 10 steps): ``beta_kl: 0.04`` there is roughly ``0.004`` here.

It also runs on diffusion models (DDIM with ``eta``), where it is DDPO with group advantages.
"""

from __future__ import annotations

from ..config import configclass, field
from ..training.objective import register_objective
from .ddpo import DDPO
from .online import OnlineOptions, gaussian_step_kl, group_advantages


@configclass
class GRPOOptions(OnlineOptions):
    num_inference_steps: int = field(10, help="sampling steps of a trajectory (flow_grpo trains on 10)")
    guidance_scale: float = field(4.5, help="CFG scale, for sampling and for re-evaluating log-probs")
    eta: float = field(0.7, help="SDE noise level a (flow); DDIM eta on diffusion models")
    timestep_fraction: float = field(0.99, help="share of each trajectory's steps trained on")
    clip_range: float = field(1e-4, help="PPO ratio clip (for per-element mean log-probs)")
    adv_clip: float = field(5.0, help="advantages are clamped to [-adv_clip, adv_clip]")
    beta_kl: float = field(0.004, help="weight of the KL to the reference (0 turns it off; see the module doc)")
    global_std: bool = field(False, help="normalise by the std of the whole batch instead of the group's")


@register_objective("grpo")
class GRPO(DDPO):
    Options = GRPOOptions
    needs_reference = True  # per instance: only with beta_kl > 0

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options, reward)
        self.needs_reference = self.options.beta_kl > 0

    def advantages(self, rollout):
        return group_advantages(rollout.rewards, rollout.group_size, self.options.global_std)

    def item_loss(self, items):
        per_item, ratio, step, old = self.policy_terms(items)
        metrics = self.ppo_metrics(ratio, step.log_prob, old)
        if self.options.beta_kl > 0:
            reference = self.log_probs(items[:, 0], items[:, 1], reference=True)
            kl = gaussian_step_kl(step.mean, reference.mean.detach(), step.std.detach())
            per_item = per_item + self.options.beta_kl * kl
            metrics["kl"] = float(kl.detach().mean())
        return per_item.mean(), metrics
