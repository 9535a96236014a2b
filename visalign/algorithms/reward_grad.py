"""Reward-gradient fine-tuning (ALGORITHMS.md §6): DRaFT, AlignProp and ReFL.

All three sample images with the current policy, decode them with the VAE and backpropagate a
*differentiable* reward through the decoder and (part of) the sampling chain into the denoiser:
``loss = shape(r(decode(x0(theta)), c))``. They differ in which denoiser calls carry gradient:

- **DRaFT** (Clark et al., ICLR 2024, "Directly Fine-Tuning Diffusion Models on Differentiable
  Rewards"): ``variant="full"`` backpropagates through every step; ``variant="k"`` only through
  the last ``k`` steps (DRaFT-K, ``k = 1`` recommended); ``variant="lv"`` (DRaFT-LV) samples
  ``x0`` without gradient, re-noises ``n`` copies to the last sampler timestep,
  ``x_1^i = a_t1 sg(x0) + s_t1 eps_i``, and takes one denoising step with gradient from each:
  ``loss = -(1/n) sum_i r(xhat0^i)``.
- **AlignProp** (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward
  Backpropagation"): randomized truncated backpropagation. A cut index ``k`` is drawn **once per
  trajectory** (``fixed`` = 49, ``uniform`` on ``{0..N-1}``, or ``gaussian`` ``int(N(42, 5))``
  redrawn until ``1 <= k < N``); steps ``k..N-1`` carry gradient and earlier ones do not. The
  official code (and TRL's copy) redrew ``k`` at every step (AlignProp issue #15), which is not a
  single contiguous cut; this implementation does not.
- **ReFL** (Xu et al., NeurIPS 2023, ImageReward paper, ``ImageReward/ReFL.py``): run the
  sampler without gradient to a random late step ``m ~ U{min_step..max_step}`` (of 40), take the
  denoiser's one-step prediction ``xhat0 = predict_x0(x_t, t_m, f(x_t, t_m, c))`` with gradient,
  and score ``decode(xhat0)``: ``loss = grad_scale * mean(relu(2 - r))``. Optionally add the
  pretraining (denoising) loss on supplied captioned images (``pretrain_weight``), which the
  paper uses and the released script omits.

Everything goes through :meth:`Generator.sample` (``grad_steps`` and its hooks), so each method
runs on every family (SD, SDXL, SD3 flow) and with any differentiable reward or weighted
combination (``rewards.load``). A reward with ``differentiable = False`` is refused. Reward
weights are frozen: gradients flow *through* the reward to the pixels, never into it.

Memory: ``gradient_checkpointing="steps"`` (default) runs every denoiser call as one
non-reentrant checkpoint (AlignProp's per-UNet-call checkpointing) and checkpoints the VAE
decoder's blocks, so backprop through ``K`` steps keeps about ``K`` latents plus one call's
activations; ``"blocks"`` uses diffusers' block-level checkpointing of the denoiser and decoder
(:meth:`Generator.enable_gradient_checkpointing`); ``"none"`` keeps every activation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective

LOSS_SHAPES = ("negative", "l1_target", "relu")
CHECKPOINTING = ("steps", "blocks", "none")
TRUNCATIONS = ("fixed", "uniform", "gaussian")


# --------------------------------------------------------------------------------------------
# Pure pieces


def reward_loss(scores: Tensor, shape: str = "negative", target: float = 0.0, scale: float = 1.0) -> Tensor:
    """The loss of a batch of (normalised) rewards ``scores [B]`` → scalar.

    - ``"negative"``: ``-mean(r)`` (DRaFT; AlignProp-HPS's ``1 - cos`` up to a constant);
    - ``"l1_target"``: ``mean(|r - target|)`` (AlignProp aesthetic, target 10);
    - ``"relu"``: ``mean(relu(target - r))`` (ReFL, target 2).

    multiplied by ``scale`` (AlignProp's ``loss_coeff`` 0.01, ReFL's ``grad_scale`` 1e-3).
    """
    scores = scores.float()
    if shape == "negative":
        loss = -scores.mean()
    elif shape == "l1_target":
        loss = (scores - target).abs().mean()
    elif shape == "relu":
        loss = torch.relu(target - scores).mean()
    else:
        raise ValueError(f"loss shape must be one of {LOSS_SHAPES}, got {shape!r}")
    return loss * scale


def draw_cuts(strategy: str, num_steps: int, count: int, rng: torch.Generator | None = None, *,
              fixed: int = 49, mean: float = 42.0, std: float = 5.0) -> Tensor:
    """AlignProp truncation indices, one per trajectory → ``[count]`` (int64).

    Steps ``k..num_steps-1`` of a trajectory with cut ``k`` carry gradient (step 0 is the noisiest).
    ``fixed``: ``k = fixed``; ``uniform``: ``k ~ U{0..N-1}``; ``gaussian``: ``k = int(N(mean, std))``
    redrawn until ``1 <= k < N`` (the official repo's default, about 8 final steps of 50).
    """
    if strategy == "fixed":
        if not 0 <= fixed < num_steps:
            raise ValueError(f"fixed truncation index {fixed} is not a step of {num_steps}")
        return torch.full((count,), fixed, dtype=torch.long)
    if strategy == "uniform":
        return torch.randint(0, num_steps, (count,), generator=rng)
    if strategy == "gaussian":
        if not 1 <= mean < num_steps:
            raise ValueError(f"gaussian truncation mean {mean} must lie in [1, {num_steps}) for {num_steps} steps")
        cuts = torch.empty(count, dtype=torch.long)
        for i in range(count):
            while True:
                k = int(mean + std * torch.randn((), generator=rng).item())
                if 1 <= k < num_steps:
                    break
            cuts[i] = k
        return cuts
    raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {strategy!r}")


class CheckpointedCalls(torch.nn.Module):
    """Runs each call of ``module`` as one non-reentrant activation checkpoint (when grad is on):
    only the call's inputs are kept and its activations are recomputed in backward."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.module, *args, use_reentrant=False, **kwargs)


class _StopSampling(Exception):
    """Ends a sampling loop early from a hook (ReFL needs the chain only up to step m)."""


# --------------------------------------------------------------------------------------------
# Options


@configclass
class RewardGradOptions:
    reward: str = field("testbed-reward", help="reward name (rewards.load) or a saved reward folder; must be differentiable")
    reward_options: dict[str, Any] = field(default_factory=dict, help="options passed to rewards.load(reward, ...)")
    reward_weights: dict[str, float] = field(default_factory=dict,
                                             help="a weighted sum of several rewards by name (replaces `reward`)")
    reward_shift: float = field(0.0, help="score = (raw - reward_shift) / reward_scale (ReFL: ImageReward's 0.16717)")
    reward_scale: float = field(1.0, help="see reward_shift (ReFL: ImageReward's 1.03334)")
    loss: str = field("negative", help="negative (-r), l1_target (|r - target|) or relu (relu(target - r))")
    target: float = field(0.0, help="the target of l1_target / the margin of relu")
    loss_scale: float = field(1.0, help="multiplies the loss")
    prompts: str = field("testbed:train", help="'testbed:train', 'testbed:heldout', or a text file of prompts")
    resolution: int | None = field(None, help="sampling resolution (default: the model's)")
    num_inference_steps: int = field(50, help="sampling steps")
    guidance_scale: float = field(7.5, help="CFG scale when sampling (<= 1: no unconditional pass)")
    eta: float = field(0.0, help="sampler stochasticity (DDIM eta / flow SDE level)")
    gradient_checkpointing: str = field("steps", help="steps (each denoiser call one checkpoint, + VAE decoder), "
                                                      "blocks (diffusers' block checkpointing), none")


@configclass
class DRaFTOptions(RewardGradOptions):
    variant: str = field("lv", help="full (all steps), k (last k steps), lv (K=1 on n re-noised copies)")
    k: int = field(1, help="DRaFT-K: steps with gradient, counted from the last")
    lv_copies: int = field(2, help="DRaFT-LV: re-noised copies n of each final sample")


@configclass
class AlignPropOptions(RewardGradOptions):
    guidance_scale: float = field(5.0, help="CFG scale when sampling")
    eta: float = field(1.0, help="DDIM eta (AlignProp's sampler)")
    loss_scale: float = field(0.01, help="AlignProp's loss_coeff")
    truncation: str = field("gaussian", help="fixed, uniform or gaussian: how the cut index k is drawn")
    truncation_fixed: int = field(49, help="k of the fixed strategy (49 of 50: only the last step)")
    truncation_mean: float = field(42.0, help="mean of the gaussian strategy")
    truncation_std: float = field(5.0, help="std of the gaussian strategy")
    cut_per: str = field("trajectory", help="trajectory (one k per sample) or batch (one k per micro-batch)")


@configclass
class ReFLOptions(RewardGradOptions):
    num_inference_steps: int = field(40, help="sampling steps (ReFL.py: 40)")
    guidance_scale: float = field(1.0, help="ReFL.py samples without CFG")
    eta: float = field(1.0, help="DDIM eta (1.0 is the DDPM-like sampler of ReFL.py)")
    loss: str = field("relu", help="ReFL: relu(target - r)")
    target: float = field(2.0, help="ReFL's margin")
    loss_scale: float = field(1e-3, help="ReFL's grad_scale")
    min_step: int = field(30, help="lowest step index m drawn (of num_inference_steps)")
    max_step: int = field(39, help="highest step index m drawn")
    pretrain_weight: float = field(0.0, help="weight of the denoising loss on captioned images (needs data)")


# --------------------------------------------------------------------------------------------
# The objectives


def build_reward(options: RewardGradOptions):
    import rewards

    if options.reward_weights:
        parts = {name: rewards.load(name) for name in options.reward_weights}
        return rewards.WeightedSum(parts, options.reward_weights)
    return rewards.load(options.reward, **options.reward_options)


class RewardGradient(Objective):
    """Shared machinery: the reward, prompts, checkpointing and the loss of decoded samples.

    ``reward``: an already built reward (else ``options.reward`` is loaded in :meth:`setup`).
    Outside the trainer, call :meth:`bind` before :meth:`loss`.
    """

    data_kinds = ()
    Options = RewardGradOptions
    needs_reference = False

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options)
        o = self.options
        if o.loss not in LOSS_SHAPES:
            raise ConfigError(f"options.loss must be one of {LOSS_SHAPES}, got {o.loss!r}")
        if o.gradient_checkpointing not in CHECKPOINTING:
            raise ConfigError(f"options.gradient_checkpointing must be one of {CHECKPOINTING}, got {o.gradient_checkpointing!r}")
        if o.reward_scale == 0:
            raise ConfigError("options.reward_scale must not be 0")
        self.reward = None
        self.prompts: list[str] | None = None
        self.batch_size = 1
        if reward is not None:
            self.set_reward(reward)

    def set_reward(self, reward) -> None:
        if not getattr(reward, "differentiable", False):
            raise ConfigError(
                f"objective {self.name!r} backpropagates the reward into the generator, but reward "
                f"{getattr(reward, 'name', type(reward).__name__)!r} is not differentiable (reward.differentiable is "
                "False). Use a differentiable reward (testbed-reward, hpsv2, pickscore, aesthetic, clip, or a "
                "WeightedSum of them), or a method that only needs scores (raft, or dpo/kto on preference-data)."
            )
        self.reward = reward.freeze() if hasattr(reward, "freeze") else reward.requires_grad_(False)

    def setup(self, trainer) -> None:
        if self.reward is None:
            self.set_reward(build_reward(self.options))
        self.bind(trainer.config.batch_size, trainer.wrapped_denoiser, trainer.device)

    def bind(self, batch_size: int, forward_module: torch.nn.Module | None = None, device=None) -> None:
        """Set the prompt batch size, move the reward to ``device`` and switch on checkpointing;
        ``forward_module`` is the module the policy's calls go through (the trainer's DDP wrapper)."""
        from ..preference_data import read_prompts

        if self.reward is None:
            self.set_reward(build_reward(self.options))
        gen = self.generator
        self.reward.to(device or gen.device)
        self.batch_size = batch_size
        if self.prompts is None:
            self.prompts = read_prompts(self.options.prompts)
        mode = self.options.gradient_checkpointing
        if mode == "blocks":
            gen.enable_gradient_checkpointing(denoiser=True, vae=True)
        elif mode == "steps":
            gen.enable_gradient_checkpointing(denoiser=False, vae=True)
            gen.set_forward_module(CheckpointedCalls(forward_module if forward_module is not None else gen.denoiser))

    def draw_prompts(self, rng: torch.Generator) -> list[str]:
        picks = torch.randint(len(self.prompts), (self.batch_size,), generator=rng).tolist()
        return [self.prompts[i] for i in picks]

    def sample_kwargs(self, rng: torch.Generator) -> dict:
        o = self.options
        return dict(num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale, eta=o.eta,
                    height=o.resolution, width=o.resolution, generator=rng)

    def score_loss(self, images: Tensor, prompts: list[str], **context: Any) -> tuple[Tensor, dict[str, float]]:
        o = self.options
        raw = self.reward(images.float(), prompts, **context)
        scores = (raw - o.reward_shift) / o.reward_scale
        loss = reward_loss(scores, o.loss, o.target, o.loss_scale)
        return loss, {"loss": loss.detach().item(), "reward": raw.detach().float().mean().item()}


@register_objective("draft")
class DRaFT(RewardGradient):
    """DRaFT / DRaFT-K / DRaFT-LV (see the module docstring)."""

    Options = DRaFTOptions

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options, reward)
        o = self.options
        if o.variant not in ("full", "k", "lv"):
            raise ConfigError(f"options.variant must be full, k or lv, got {o.variant!r}")
        if o.variant == "k" and not 1 <= o.k <= o.num_inference_steps:
            raise ConfigError(f"options.k={o.k} must lie in [1, num_inference_steps={o.num_inference_steps}]")
        if o.variant == "lv" and o.lv_copies < 1:
            raise ConfigError(f"options.lv_copies must be at least 1, got {o.lv_copies}")

    def grad_steps(self):
        o = self.options
        if o.variant == "full":
            return "all"
        return range(o.num_inference_steps - o.k, o.num_inference_steps)

    def loss(self, batch, rng: torch.Generator):
        prompts = self.draw_prompts(rng)
        if self.options.variant == "lv":
            return self._lv_loss(prompts, rng)
        out = self.generator.sample(prompts, grad_steps=self.grad_steps(), **self.sample_kwargs(rng))
        return self.score_loss(out.images, prompts)

    def _lv_loss(self, prompts: list[str], rng: torch.Generator):
        gen, o = self.generator, self.options
        with torch.no_grad():
            base = gen.sample(prompts, output_type="latent", **self.sample_kwargs(rng))
        x0 = base.latents.detach().repeat_interleave(o.lv_copies, dim=0)
        timesteps, next_timesteps = gen.sampling_timesteps(o.num_inference_steps)
        t_last, t_end = timesteps[-1], next_timesteps[-1]
        noise = torch.randn(x0.shape, generator=rng, device=rng.device).to(x0)
        x_last = gen.add_noise(x0, noise, t_last)
        cond = base.cond.repeat_interleave(o.lv_copies)
        out = gen.guided_prediction(x_last, t_last, cond, o.guidance_scale)
        x0_hat = gen.step(x_last, t_last, t_end, out, eta=0.0).prev_sample
        copies = [p for p in prompts for _ in range(o.lv_copies)]
        return self.score_loss(gen.decode(x0_hat), copies)


@register_objective("alignprop")
class AlignProp(RewardGradient):
    """AlignProp with one truncation cut per trajectory (see the module docstring)."""

    Options = AlignPropOptions

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options, reward)
        o = self.options
        if o.cut_per not in ("trajectory", "batch"):
            raise ConfigError(f"options.cut_per must be trajectory or batch, got {o.cut_per!r}")
        draw_cuts(o.truncation, o.num_inference_steps, 0, fixed=o.truncation_fixed, mean=o.truncation_mean,
                  std=o.truncation_std)  # validates the strategy and its parameters

    def draw_cuts(self, rng: torch.Generator) -> Tensor:
        o = self.options
        count = self.batch_size if o.cut_per == "trajectory" else 1
        cuts = draw_cuts(o.truncation, o.num_inference_steps, count, rng, fixed=o.truncation_fixed,
                         mean=o.truncation_mean, std=o.truncation_std)
        return cuts.expand(self.batch_size) if o.cut_per == "batch" else cuts

    def loss(self, batch, rng: torch.Generator):
        prompts = self.draw_prompts(rng)
        cuts = self.draw_cuts(rng)
        first = int(cuts.min())

        def detach_before_cut(state):
            # Rows whose cut is later than this step get a detached output: no gradient to theta.
            keep = state.index >= cuts
            if bool(keep.all()):
                return None
            rows = keep.to(state.model_output.device).reshape(-1, *([1] * (state.model_output.dim() - 1)))
            return torch.where(rows, state.model_output, state.model_output.detach())

        out = self.generator.sample(prompts, grad_steps=lambda index: index >= first, on_model_output=detach_before_cut,
                                    **self.sample_kwargs(rng))
        loss, metrics = self.score_loss(out.images, prompts)
        metrics["grad_steps"] = float((self.options.num_inference_steps - cuts).float().mean())
        return loss, metrics


@register_objective("refl")
class ReFL(RewardGradient):
    """ReFL: reward of the one-step ``x0`` prediction at a random late step (module docstring)."""

    Options = ReFLOptions

    def __init__(self, generator, options=None, reward=None):
        super().__init__(generator, options, reward)
        o = self.options
        if not 0 <= o.min_step <= o.max_step < o.num_inference_steps:
            raise ConfigError(f"need 0 <= min_step ({o.min_step}) <= max_step ({o.max_step}) < num_inference_steps "
                              f"({o.num_inference_steps})")
        # With the pretraining regulariser the objective consumes captioned images.
        self.data_kinds = ("caption",) if o.pretrain_weight > 0 else ()

    def loss(self, batch, rng: torch.Generator):
        gen, o = self.generator, self.options
        prompts = self.draw_prompts(rng)
        step = int(torch.randint(o.min_step, o.max_step + 1, (1,), generator=rng))
        captured = {}

        def one_step_x0(state):
            if state.index == step:
                captured["x0"] = gen.predict_x0(state.latents, state.t, state.model_output)
                raise _StopSampling

        try:
            gen.sample(prompts, grad_steps={step}, on_model_output=one_step_x0, output_type="latent",
                       **self.sample_kwargs(rng))
        except _StopSampling:
            pass
        loss, metrics = self.score_loss(gen.decode(captured["x0"]), prompts)
        metrics["refl_step"] = float(step)
        if o.pretrain_weight > 0:
            if batch is None:
                raise ConfigError("refl with pretrain_weight > 0 needs captioned images: set data.path")
            from .common import batch_latents, denoising_loss, prompt_cond

            (latents,) = batch_latents(gen, batch, ("images",), rng)
            pretrain = denoising_loss(gen, latents, prompt_cond(gen, batch), rng).mean()
            loss = loss + o.pretrain_weight * pretrain
            metrics["pretrain_loss"] = pretrain.detach().item()
            metrics["loss"] = loss.detach().item()
        return loss, metrics

