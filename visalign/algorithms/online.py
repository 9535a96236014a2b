"""Online reward fine-tuning, the parts PRDP, DDPO and Flow-GRPO share (ALGORITHMS.md §5, §7, §12).

The loop, driven by the trainer through :class:`OnlineObjective`:

1. **Collect** (``before_step``, every ``refresh_every`` optimisation steps, no gradient): sample
   ``group_size`` images for each of ``prompts_per_refresh`` prompts with the *current* weights
   (the snapshot ``theta_old``) and the Generator's stochastic step (DDIM with ``eta > 0``, or
   the flow SDE with noise level ``eta``), keeping every state ``x_t``, the timesteps and the
   per-step log-probabilities (:func:`collect_rollout`). Nothing but these tensors is stored.
2. **Score** with any reward, black box, no gradient: one registry name or several with
   weights (:class:`RewardMix`); optionally keep only each prompt group's Pareto front
   (Parrot's batch-wise selection, :func:`group_pareto_mask`).
3. **Train** (``loss``): each micro-batch re-evaluates ``batch_size`` stored transitions
   ``x_t -> x_{t-1}`` under the current weights (:func:`transition_log_probs`, one batched
   denoiser call with classifier-free guidance exactly as sampling used it) and the subclass
   turns log-ratios into a loss (PPO clip for DDPO / GRPO, reward-difference regression for PRDP).

Conventions: log-probabilities are per-element **means** (the Generator's convention, see
:func:`visalign.models.base.gaussian_log_prob`), which is what the 1e-4 clip ranges are tuned
for. Advantages: DDPO's per-prompt tracker (:class:`PerPromptStatTracker`) or Flow-GRPO's
group statistics (:func:`group_advantages`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..models import Cond, Generator
from ..training.objective import Objective

# --------------------------------------------------------------------------------------------
# Rewards


class RewardMix:
    """Several rewards with weights: ``total = sum_k w_k r_k``; ``components`` is ``[B, K]``.

    Each reward is a ``rewards.Reward`` (black box: scored under ``no_grad``). The components
    are kept for Pareto selection (which is scale-free) and logging.
    """

    def __init__(self, rewards: dict[str, Any], weights: dict[str, float]):
        if not rewards:
            raise ConfigError("online objectives need at least one reward")
        self.names = list(rewards)
        self.rewards = rewards
        self.weights = torch.tensor([float(weights[name]) for name in self.names])

    @classmethod
    def load(cls, weights: dict[str, float], options: dict[str, dict] | None = None, device=None) -> "RewardMix":
        import rewards

        options = options or {}
        unknown = sorted(set(options) - set(weights))
        if unknown:
            raise ConfigError(f"reward_options names rewards that are not in rewards: {unknown}")
        loaded = {}
        for name in weights:
            reward = rewards.load(name, **options.get(name, {}))
            loaded[name] = reward.to(device) if device is not None else reward
        return cls(loaded, weights)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        columns = []
        with torch.no_grad():
            for name in self.names:
                reward = self.rewards[name]
                scores = reward(images, list(prompts)).detach().float().cpu().reshape(-1)
                if not torch.isfinite(scores).all():
                    raise ValueError(f"reward {name!r} returned non-finite scores")
                columns.append(scores)
        components = torch.stack(columns, dim=1)
        return (components * self.weights).sum(dim=1), components


def group_pareto_mask(components: Tensor, group_size: int) -> Tensor:
    """Parrot's batch-wise Pareto selection, per prompt group: ``BoolTensor[B]``, true where no
    other image of the same prompt dominates the sample on every reward (``components [B, K]``,
    groups of ``group_size`` adjacent rows)."""
    from rewards import pareto_front

    if components.shape[0] % group_size:
        raise ValueError(f"{components.shape[0]} samples do not split into groups of {group_size}")
    groups = components.reshape(-1, group_size, components.shape[1])
    return torch.cat([pareto_front(group) for group in groups])


# --------------------------------------------------------------------------------------------
# Advantages


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation (ddpo-pytorch ``stat_tracking.py``).

    Each prompt keeps a deque of its last ``buffer_size`` rewards. A batch's rewards are added
    first; a prompt whose history holds fewer than ``min_count`` rewards is normalised with the
    mean and std of the whole batch instead. ``A = (r - mean) / (std + 1e-6)`` (population std).
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        rewards = rewards.detach().double().cpu()
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            history = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[rows].tolist())
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(history), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[rows] = (rewards[rows] - mean) / (std + 1e-6)
        return advantages.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {prompt: list(values) for prompt, values in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["stats"].items()}


def group_advantages(rewards: Tensor, group_size: int, global_std: bool = False, eps: float = 1e-4) -> Tensor:
    """Flow-GRPO: ``A = (r - mean_group) / (std + eps)`` over groups of ``group_size`` adjacent
    samples; ``std`` is the group's (population) std, or the whole batch's with ``global_std``."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    grouped = rewards.float().reshape(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = rewards.float().std(unbiased=False) if global_std else grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


# --------------------------------------------------------------------------------------------
# Losses (pure functions)


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
                  adv_clip: float = 5.0) -> tuple[Tensor, Tensor]:
    """DDPO / Flow-GRPO per-transition loss ``max(-A r, -A clamp(r, 1-c, 1+c))`` with
    ``r = exp(log_prob - old_log_prob)`` and ``A`` clamped to ``[-adv_clip, adv_clip]``.
    Returns ``(loss [B], ratio [B])``."""
    advantages = advantages.to(log_prob).clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def gaussian_step_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussian steps with the same ``std``: ``||mu - mu_ref||^2 / (2 std^2)``,
    averaged over latent elements (the log-prob convention) → ``[B]``."""
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Trajectory collection


@dataclass
class Rollout:
    """Trajectories of one refresh, grouped by prompt (``group_size`` adjacent samples).

    ``latents [B, N+1, ...]`` (noise to sample), ``timesteps``/``next_timesteps [N]``,
    ``log_probs [B, N]`` (under the sampling snapshot), ``cond`` (the prompts' conditioning),
    ``rewards [B]`` (weighted total) and ``components [B, K]``; ``selected [B]`` is the Pareto
    mask (all true without selection); ``advantages [B]`` for the policy-gradient methods.
    """

    prompts: list[str]
    group_size: int
    latents: Tensor
    timesteps: Tensor
    next_timesteps: Tensor
    log_probs: Tensor
    cond: Cond
    rewards: Tensor | None = None
    components: Tensor | None = None
    selected: Tensor | None = None
    advantages: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def state_dict(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cond"}
        state["cond"] = {f.name: getattr(self.cond, f.name) for f in dataclasses.fields(self.cond)}
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "Rollout":
        values = dict(state)
        values["cond"] = Cond(**values["cond"]).to(device) if device is not None else Cond(**values["cond"])
        if device is not None:
            values["latents"] = values["latents"].to(device)
        return cls(**values)


def collect_rollout(generator: Generator, prompts: Sequence[str], group_size: int, *, num_inference_steps: int,
                    guidance_scale: float, eta: float, seed: int, chunk_size: int = 32,
                    resolution: int | None = None) -> tuple[Rollout, Tensor]:
    """Sample ``group_size`` images of every prompt with the current weights, no gradient.

    Returns the :class:`Rollout` (latents, timesteps, log-probs, conditioning) and the decoded
    images ``[B, 3, H, W]`` for the reward. Sampling runs in chunks of at most ``chunk_size``
    images, seeded by ``seed`` (chunk ``i`` by ``seed + i``), at ``resolution`` (default: the model's).
    """
    if eta <= 0:
        raise ConfigError("online objectives need a stochastic sampler: eta > 0")
    expanded = [p for p in prompts for _ in range(group_size)]
    latents, log_probs, conds, images = [], [], [], []
    timesteps = next_timesteps = None
    with torch.no_grad():
        for index, start in enumerate(range(0, len(expanded), chunk_size)):
            part = expanded[start : start + chunk_size]
            rng = torch.Generator(generator.device).manual_seed(seed + index)
            out = generator.sample(part, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   eta=eta, generator=rng, return_trajectory=True, height=resolution,
                                   width=resolution)
            trajectory = out.trajectory
            latents.append(trajectory.latents)
            log_probs.append(trajectory.log_probs)
            conds.append(out.cond.detach())
            images.append(out.images.float())
            timesteps, next_timesteps = trajectory.timesteps, trajectory.next_timesteps
    rollout = Rollout(prompts=expanded, group_size=group_size, latents=torch.cat(latents),
                      timesteps=timesteps.cpu(), next_timesteps=next_timesteps.cpu(),
                      log_probs=torch.cat(log_probs).float().cpu(), cond=Cond.cat(conds))
    return rollout, torch.cat(images)


def transition_log_probs(generator: Generator, rollout: Rollout, samples: Tensor, steps: Tensor, *,
                         guidance_scale: float, eta: float):
    """Re-evaluate the stored transitions ``(samples[i], steps[i])`` in one batched call.

    Returns the :class:`~visalign.models.base.StepOutput` (``log_prob [n]`` differentiable in the
    trainable weights when ``generator`` is the policy; no gradient on its reference view).
    """
    device = generator.device
    samples_d, steps_d = samples.to(rollout.latents.device), steps.to(rollout.latents.device)
    x_t = rollout.latents[samples_d, steps_d].to(device)
    prev = rollout.latents[samples_d, steps_d + 1].to(device)
    t = rollout.timesteps[steps].to(device)
    t_next = rollout.next_timesteps[steps].to(device)
    cond = rollout.cond[samples.to(rollout.cond.prompt_embeds.device)].to(device)
    return generator.step_log_prob(x_t, t, t_next, prev, cond, eta, guidance_scale)


# --------------------------------------------------------------------------------------------
# The shared objective


@configclass
class OnlineOptions:
    rewards: dict[str, float] = field(default_factory=lambda: {"testbed-oracle": 1.0},
                                      help="reward names (rewards.load) and their weights; total = sum w_k r_k")
    reward_options: dict[str, dict] = field(default_factory=dict, help="options per reward name (rewards.load)")
    prompts: str = field("testbed:train", help="'testbed:train', 'testbed:heldout', or a text file of prompts")
    prompts_per_refresh: int = field(8, help="prompts sampled at each refresh")
    group_size: int = field(4, help="images per prompt (>= 2)")
    refresh_every: int = field(4, help="optimisation steps between refreshes (K): resample with the current weights")
    num_inference_steps: int = field(20, help="sampling steps of a trajectory")
    guidance_scale: float = field(4.0, help="CFG scale, for sampling and for re-evaluating log-probs")
    eta: float = field(1.0, help="stochasticity: DDIM eta (diffusion) or SDE noise level (flow)")
    timestep_fraction: float = field(1.0, help="share of each trajectory's steps trained on")
    pareto: bool = field(False, help="Parrot: train only on each prompt group's Pareto front over the rewards")
    sample_chunk: int = field(32, help="images per sampling call")
    resolution: int | None = field(None, help="sampling height and width (default: the model's)")


class OnlineObjective(Objective):
    """Base of PRDP, DDPO and GRPO: collection in ``before_step``, stored-transition training in
    ``loss``. Subclasses define :meth:`prepare` (advantages, items) and :meth:`item_loss`.

    An *item* is one unit of a micro-batch (``batch_size`` items per ``loss`` call): a
    (sample, step) transition for DDPO / GRPO, a (pair, step) or a whole pair for PRDP.
    ``reward``: an already built reward (a ``rewards.Reward`` or a :class:`RewardMix`) that
    replaces ``options.rewards``.
    """

    data_kinds = ()
    Options = OnlineOptions
    needs_reference = False

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options)
        o = self.options
        if o.group_size < 2:
            raise ConfigError("options.group_size must be at least 2 (advantages and pairs compare images of a prompt)")
        if not 0 < o.timestep_fraction <= 1:
            raise ConfigError(f"options.timestep_fraction must be in (0, 1], got {o.timestep_fraction}")
        if o.eta <= 0:
            raise ConfigError("options.eta must be > 0: the stochastic step gives the log-probabilities")
        if o.refresh_every < 1:
            raise ConfigError("options.refresh_every must be at least 1")
        self._reward_override = reward
        self.rollout: Rollout | None = None
        self.items: Tensor | None = None
        self.cursor = 0
        self.refreshes = 0
        self.last: dict[str, float] = {}

    # ---------------------------------------------------------------- set-up and collection

    def setup(self, trainer) -> None:
        from ..preference_data import read_prompts

        self.device = trainer.device
        self.batch_size = trainer.config.batch_size
        self.seed = trainer.config.seed
        self.rank = trainer.accelerator.process_index
        # Sample under the same autocast as the loss re-evaluates in (mixed precision), so that
        # ratios start at 1 (ddpo-pytorch samples under autocast too).
        self.autocast = getattr(trainer.accelerator, "autocast", contextlib.nullcontext)
        reward = self._reward_override
        if reward is None:
            reward = RewardMix.load(self.options.rewards, self.options.reward_options, device=trainer.device)
        elif not isinstance(reward, RewardMix):
            reward = RewardMix({getattr(reward, "name", "reward") or "reward": reward},
                               {getattr(reward, "name", "reward") or "reward": 1.0})
        self.reward = reward
        self.prompt_pool = read_prompts(self.options.prompts)

    def choose_prompts(self, step: int) -> list[str]:
        """The refresh's prompts: a function of (seed, step, rank), so a resumed run repeats them."""
        rng = random.Random((self.seed * 1_000_003 + step) * 8_191 + self.rank)
        count = self.options.prompts_per_refresh
        if count <= len(self.prompt_pool):
            return rng.sample(self.prompt_pool, count)
        return [rng.choice(self.prompt_pool) for _ in range(count)]

    def before_step(self, trainer, step: int) -> None:
        if self.rollout is not None and step % self.options.refresh_every:
            return
        self.refresh(step)

    def refresh(self, step: int) -> None:
        o = self.options
        seed = ((self.seed * 1_000_003 + step) * 8_191 + self.rank) % (2**62)
        with self.autocast():
            rollout, images = collect_rollout(
                self.generator, self.choose_prompts(step), o.group_size, num_inference_steps=o.num_inference_steps,
                guidance_scale=o.guidance_scale, eta=o.eta, seed=seed, chunk_size=o.sample_chunk,
                resolution=o.resolution)
        rollout.rewards, rollout.components = self.reward(images, rollout.prompts)
        rollout.selected = (group_pareto_mask(rollout.components, o.group_size) if o.pareto
                            else torch.ones(len(rollout), dtype=torch.bool))
        self.rollout = rollout
        self.last = {"reward_mean": float(rollout.rewards.mean()), "reward_std": float(rollout.rewards.std()),
                     **{f"reward/{n}": float(c.mean()) for n, c in zip(self.reward.names, rollout.components.T)}}
        if o.pareto:
            self.last["pareto_share"] = float(rollout.selected.float().mean())
        generator = torch.Generator().manual_seed(seed)
        self.items = self.prepare(rollout, generator)  # may add metrics to self.last
        self.cursor = 0
        self.refreshes += 1

    def trained_steps(self, count: int, generator: torch.Generator) -> Tensor:
        """``[count, n]``: for each of ``count`` rows, a random subset of ``n = int(N * fraction)``
        step indices in random order (DDPO shuffles the timesteps of every sample)."""
        steps = self.rollout.num_steps
        n = max(1, int(steps * self.options.timestep_fraction))
        order = torch.argsort(torch.rand(count, steps, generator=generator), dim=1)
        return order[:, :n]

    def next_items(self) -> Tensor:
        """The next ``batch_size`` items of the shuffled list (wrapping around: a second pass
        over the same rollout when ``refresh_every`` asks for more items than it holds)."""
        total = self.items.shape[0]
        if total == 0:
            return self.items
        index = (torch.arange(self.batch_size) + self.cursor) % total
        self.cursor = (self.cursor + self.batch_size) % total
        return self.items[index]

    # ---------------------------------------------------------------- the loss

    def prepare(self, rollout: Rollout, generator: torch.Generator) -> Tensor:
        """Compute advantages / targets on ``rollout``; return the shuffled item table ``[M, ...]``."""
        raise NotImplementedError

    def item_loss(self, items: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def loss(self, batch, rng: torch.Generator):
        items = self.next_items()
        if items.shape[0] == 0:  # nothing to learn from this rollout (e.g. no informative pair)
            zero = sum(p.sum() * 0.0 for p in self.generator.trainable_parameters())
            return zero, {"loss": 0.0, "empty_batch": 1.0, **self.last}
        loss, metrics = self.item_loss(items)
        return loss, {"loss": float(loss.detach()), **metrics, **self.last}

    def log_probs(self, samples: Tensor, steps: Tensor, reference: bool = False):
        generator = self.generator.reference() if reference else self.generator
        return transition_log_probs(generator, self.rollout, samples, steps,
                                    guidance_scale=self.options.guidance_scale, eta=self.options.eta)

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cursor": self.cursor, "refreshes": self.refreshes, "last": dict(self.last)}
        if self.rollout is not None:
            state["rollout"] = self.rollout.state_dict()
            state["items"] = self.items
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = state["cursor"]
        self.refreshes = state["refreshes"]
        self.last = dict(state["last"])
        if "rollout" in state:
            self.rollout = Rollout.from_state_dict(state["rollout"], device=getattr(self, "device", None))
            self.items = state["items"]
