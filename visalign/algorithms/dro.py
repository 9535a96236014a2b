"""Diffusion-DRO: ranking-based preference optimisation from expert images and the policy's own
samples (basiclab/DiffusionDRO; NeurIPS 2025, "Ranking-based Preference Optimization for
Diffusion Models from Implicit User Feedback"). ALGORITHMS.md §10.

Data is **winners only**: offline "expert" images with their prompts. The negatives are online:

- a *lagged* copy of the trainable model, refreshed from the trainable weights every
  ``refresh_every`` steps (official ``buffer_update_steps = 16``), samples a trajectory for each
  prompt of the batch (20 steps, no CFG) and stores, for every step, the latent entering it
  ``x_t^P``, its timestep ``t`` and the lagged model's prediction ``eps^P`` at ``x_t^P``, next to
  the expert latent ``x0^E`` and the prompt (a replay buffer of the last ``buffer_batches``
  sampled batches; official: 4 trajectories per device);
- the loss draws buffer entries (random trajectory, random step), noises the expert at the same
  ``t`` with fresh noise and ranks the expert above the policy sample relative to the frozen
  reference::

      l_E  = mse(f_theta(x_t^E), target(x0^E, eps^E, t)),  r_E  = the same with the reference
      l_P  = mse(f_theta(x_t^P), eps^P),                    r_P  = the same with the reference
      diff = (l_E - r_E) - (l_P - r_P)
      loss = mean(max(diff + margin, 0))                    margin = 1e-3

The target of the policy sample is the lagged model's own prediction, not a true noise: while the
trainable model equals the lagged one ``l_P`` is about 0 and the ranking signal comes from the
reference terms (§10, pitfalls). "Prediction" is the family's regression output (noise for
epsilon models, v for v-prediction, velocity for flow models), so the same loss trains every
family.

Timesteps: the official sampler is DPMSolver++ on base steps {950, 900, ..., 0} plus a random
offset in [0, 50) per sample. We sample with the Generator's sampler (DDIM / flow Euler) and, for
diffusion models, add one random offset in [0, T / N) per sampled batch (the sampler steps all
samples of a batch together); flow models use the scheduler's sigma grid unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_cond, batch_latents, per_sample_mse, prompt_dropout_mask
from .seppo import frozen_view


def dro_loss(policy_expert: Tensor, reference_expert: Tensor, policy_sample: Tensor, reference_sample: Tensor,
             margin: float = 1e-3) -> Tensor:
    """Hinge ranking loss per sample ``[B]``: ``max((l_E - r_E) - (l_P - r_P) + margin, 0)``."""
    diff = (policy_expert - reference_expert) - (policy_sample - reference_sample)
    return torch.relu(diff + margin)


@configclass
class DROOptions:
    margin: float = field(1e-3, help="hinge margin (official 1e-3)")
    refresh_every: int = field(16, help="steps between refreshes of the lagged policy (official buffer_update_steps)")
    buffer_batches: int = field(4, help="most recent sampled batches kept in the replay buffer (official: 4)")
    generate_every: int = field(1, help="optimisation steps between new trajectories (official: every step)")
    num_inference_steps: int = field(20, help="lagged-policy sampler steps (official: 20)")
    guidance_scale: float = field(1.0, help="lagged-policy sampler CFG (official: 1.0, no CFG)")
    timestep_jitter: bool = field(True, help="diffusion: random offset in [0, T/N) added to the sampling grid")
    prompt_dropout: float = field(0.2, help="probability of the empty prompt for a buffer entry (official 0.2)")


@register_objective("dro")
class DiffusionDRO(Objective):
    """Diffusion-DRO on winners-only data; reference = ``Generator.reference()`` (frozen init)."""

    data_kinds = ("caption", "pair")
    Options = DROOptions
    needs_reference = True

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        o = self.options
        if o.margin < 0:
            raise ConfigError(f"options.margin must be >= 0, got {o.margin}")
        for name in ("refresh_every", "buffer_batches", "generate_every", "num_inference_steps"):
            if getattr(o, name) < 1:
                raise ConfigError(f"options.{name} must be >= 1, got {getattr(o, name)}")
        self.buffer: list[dict] = []
        self.lagged_module: torch.nn.Module | None = None
        self.lagged = None
        self.step = 0
        self.lagged_step = -1

    # ---------------------------------------------------------------- the lagged policy

    def setup(self, trainer=None) -> None:
        """Make the lagged copy (also usable without a trainer)."""
        if self.lagged_module is None:
            self.lagged_module = copy.deepcopy(self.generator.denoiser).requires_grad_(False).eval()
            self.lagged = frozen_view(self.generator, self.lagged_module)
            self.lagged_step = 0

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.generator.denoiser.named_parameters() if p.requires_grad}

    def refresh_lagged(self, step: int) -> None:
        """Copy the trainable weights into the lagged policy."""
        self.setup()
        lagged = dict(self.lagged_module.named_parameters())
        with torch.no_grad():
            for name, p in self._trainable().items():
                lagged[name].copy_(p)
        self.lagged_step = step

    def before_step(self, trainer, step: int) -> None:
        self.step = step
        if step % self.options.refresh_every == 0 and step != self.lagged_step:
            self.refresh_lagged(step)

    # ---------------------------------------------------------------- the replay buffer

    def fill_buffer(self, prompts: list[str], experts: Tensor, rng: torch.Generator, height: int, width: int) -> dict:
        """Sample one trajectory per prompt with the lagged policy and store, per step, the latent
        entering the step, its timestep and the lagged prediction there, with the expert latents."""
        self.setup()
        gen = self.generator
        options = self.options
        view = copy.copy(self.lagged)
        if options.timestep_jitter and not gen.is_flow:
            spacing = gen.num_train_timesteps // options.num_inference_steps
            offset = int(torch.randint(spacing, (1,), generator=rng).item())
            grid, last = gen.sampling_timesteps, gen.num_train_timesteps - 1

            def jittered(num_steps):
                timesteps, next_timesteps = grid(num_steps)
                return (timesteps + offset).clamp(max=last), (next_timesteps + offset).clamp(max=last)

            view.sampling_timesteps = jittered
        states, timesteps, predictions = [], [], []

        def record(state):
            states.append(state.latents.detach())
            timesteps.append(torch.as_tensor(state.t).detach().cpu())
            predictions.append(state.model_output.detach())

        noise = torch.randn(gen.latent_shape(len(prompts), height, width), generator=rng).to(gen.device, gen.dtype)
        noise = noise * getattr(gen.scheduler, "init_noise_sigma", 1.0)
        with torch.no_grad():
            view.sample(prompts, latents=noise, num_inference_steps=options.num_inference_steps,
                        guidance_scale=options.guidance_scale, eta=0.0, height=height, width=width,
                        output_type="latent", on_model_output=record)
        entry = {
            "prompts": list(prompts),
            "experts": experts.detach(),
            "latents": torch.stack(states, dim=1),         # [B, N, C, h, w]: x_t entering step k
            "timesteps": torch.stack(timesteps),            # [N]
            "predictions": torch.stack(predictions, dim=1),  # [B, N, C, h, w]: lagged output at x_t
            "lagged_step": self.lagged_step,
        }
        self.buffer.append(entry)
        del self.buffer[: -options.buffer_batches]
        return entry

    def draw(self, count: int, rng: torch.Generator) -> dict:
        """``count`` buffer entries, each a random sample of a random stored batch at a random step."""
        sizes = torch.tensor([len(entry["prompts"]) for entry in self.buffer])
        flat = torch.randint(int(sizes.sum()), (count,), generator=rng)
        batch_of = torch.bucketize(flat, sizes.cumsum(0), right=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        steps = torch.randint(self.options.num_inference_steps, (count,), generator=rng)
        picked = {"prompts": [], "experts": [], "latents": [], "timesteps": [], "predictions": []}
        for b, i, k in zip(batch_of.tolist(), (flat - starts[batch_of]).tolist(), steps.tolist()):
            entry = self.buffer[b]
            picked["prompts"].append(entry["prompts"][i])
            picked["experts"].append(entry["experts"][i])
            picked["latents"].append(entry["latents"][i, k])
            picked["timesteps"].append(entry["timesteps"][k])
            picked["predictions"].append(entry["predictions"][i, k])
        return {k: (v if k == "prompts" else torch.stack(v)) for k, v in picked.items()}

    # ---------------------------------------------------------------- the loss

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        key = "images" if "images" in batch else "winner"
        height, width = batch[key].shape[-2], batch[key].shape[-1]
        if not self.buffer or self.step % self.options.generate_every == 0:
            (experts,) = batch_latents(gen, batch, (key,), rng)
            drop = prompt_dropout_mask(len(batch["prompts"]), self.options.prompt_dropout, rng)
            prompts = [("" if drop is not None and bool(drop[i]) else p) for i, p in enumerate(batch["prompts"])]
            self.fill_buffer(prompts, experts, rng, height, width)
        count = len(batch["prompts"])
        drawn = self.draw(count, rng)
        t = drawn["timesteps"].to(gen.device)
        experts = drawn["experts"].to(gen.device)
        noise = torch.randn(experts.shape, generator=rng).to(experts)
        x_expert = gen.add_noise(experts, noise, t)
        target_expert = gen.target(experts, noise, t)
        x_t = torch.cat([x_expert, drawn["latents"].to(x_expert)])
        target = torch.cat([target_expert, drawn["predictions"].to(target_expert)])
        cond = batch_cond(gen, {}, drawn["prompts"] * 2, height, width)
        timesteps = torch.cat([t, t])
        policy = per_sample_mse(gen.predict(x_t, timesteps, cond), target).view(2, count)
        with torch.no_grad():
            reference = per_sample_mse(gen.reference().predict(x_t, timesteps, cond), target).view(2, count)
        per_sample = dro_loss(policy[0], reference[0], policy[1], reference[1], self.options.margin)
        loss = per_sample.mean()
        diff = ((policy[0] - reference[0]) - (policy[1] - reference[1])).detach()
        metrics = {
            "loss": loss.detach().item(),
            "ranking_accuracy": (diff <= -self.options.margin).float().mean().item(),
            "diff": diff.mean().item(),
            "mse_expert": policy[0].detach().mean().item(),
            "mse_sample": policy[1].detach().mean().item(),
            "ref_mse_expert": reference[0].mean().item(),
            "ref_mse_sample": reference[1].mean().item(),
            "lagged_step": float(self.lagged_step),
        }
        return loss, metrics

    # ---------------------------------------------------------------- resume

    def state_dict(self):
        lagged = {}
        if self.lagged_module is not None:
            own = dict(self.lagged_module.named_parameters())
            lagged = {name: own[name].detach().to("cpu").clone() for name in self._trainable()}
        buffer = [{k: (v.to("cpu") if isinstance(v, Tensor) else v) for k, v in entry.items()} for entry in self.buffer]
        return {"buffer": buffer, "lagged": lagged, "lagged_step": self.lagged_step}

    def load_state_dict(self, state):
        self.setup()
        device = self.generator.device
        self.buffer = [{k: (v.to(device) if isinstance(v, Tensor) and k != "timesteps" else v) for k, v in e.items()}
                       for e in state["buffer"]]
        own = dict(self.lagged_module.named_parameters())
        with torch.no_grad():
            for name, value in state["lagged"].items():
                own[name].copy_(value)
        self.lagged_step = state["lagged_step"]
