"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for
Generative Foundation Model Alignment", arXiv 2304.06767), a.k.a. best-of-n rejection-sampling
fine-tuning.

Online, every ``refresh_every`` optimisation steps: sample ``num_candidates`` images per prompt
from the current policy, score them with the reward, keep the best of each prompt (optionally
only if its reward clears ``min_reward``), and fit the policy to the kept images with the plain
denoising / flow-matching loss (:mod:`visalign.algorithms.sft`). No data set is needed, only
prompts and a reward (black box, no gradient), so it is the simplest way to align a model to
any reward and the baseline the preference methods should beat.

Deviation: the paper's image experiments rank by a reward and fine-tune on the top
``1/k`` share of a batch; here the ranking is within each prompt's candidates (best-of-n per
prompt), which keeps every prompt represented.
"""

from __future__ import annotations

import random

import torch

from ..config import configclass, field
from ..training.objective import Objective, register_objective
from ..preference_data import read_prompts
from .common import denoising_loss


@configclass
class RAFTOptions:
    reward: str = field("testbed-oracle", help="reward name (rewards.load) or a saved reward folder")
    prompts: str = field("testbed:train", help="'testbed:train', 'testbed:heldout', or a text file of prompts")
    prompts_per_refresh: int = field(16, help="prompts sampled at each refresh")
    num_candidates: int = field(4, help="images per prompt; the best one is kept")
    refresh_every: int = field(10, help="optimisation steps between refreshes")
    buffer_size: int = field(256, help="most recent kept samples trained on")
    min_reward: float | None = field(None, help="keep a best sample only if its reward is at least this")
    num_inference_steps: int = field(20, help="sampling steps")
    guidance_scale: float = field(4.0, help="sampling CFG scale")


@register_objective("raft")
class RAFT(Objective):
    data_kinds = ()
    Options = RAFTOptions
    needs_reference = False

    def setup(self, trainer) -> None:
        import rewards

        self.reward = rewards.load(self.options.reward).to(trainer.device)
        self.prompts = read_prompts(self.options.prompts)
        self.rng = random.Random(trainer.config.seed)
        self.latents: list[torch.Tensor] = []
        self.buffer_prompts: list[str] = []
        self.batch_size = trainer.config.batch_size
        self.kept_reward = self.sample_reward = float("nan")
        self.seed = trainer.config.seed

    def before_step(self, trainer, step: int) -> None:
        if step % self.options.refresh_every and self.latents:
            return
        # With a strict min_reward the first rounds may keep nothing: sample again (at most 8 rounds).
        for attempt in range(8):
            self._refresh(step, attempt)
            if self.latents:
                return
        from ..training.trainer import TrainingError

        raise TrainingError(
            f"RAFT kept no samples in 8 rounds of {self.options.prompts_per_refresh} prompts x "
            f"{self.options.num_candidates} candidates: lower options.min_reward ({self.options.min_reward})"
        )

    def _refresh(self, step: int, attempt: int) -> None:
        options = self.options
        gen = self.generator
        prompts = self.rng.sample(self.prompts, min(options.prompts_per_refresh, len(self.prompts)))
        candidates = [p for p in prompts for _ in range(options.num_candidates)]
        out = gen.sample(candidates, num_inference_steps=options.num_inference_steps,
                         guidance_scale=options.guidance_scale,
                         generator=torch.Generator(gen.device).manual_seed(self.seed * 7919 + step * 31 + attempt))
        scores = self.reward(out.images.float(), candidates).float().reshape(len(prompts), options.num_candidates)
        best = scores.argmax(dim=1)
        kept = []
        for row, prompt in enumerate(prompts):
            score = scores[row, best[row]].item()
            if options.min_reward is None or score >= options.min_reward:
                kept.append(score)
                self.latents.append(out.latents[row * options.num_candidates + best[row]].detach())
                self.buffer_prompts.append(prompt)
        self.latents = self.latents[-options.buffer_size :]
        self.buffer_prompts = self.buffer_prompts[-options.buffer_size :]
        self.kept_reward = sum(kept) / len(kept) if kept else float("nan")
        self.sample_reward = float(scores.mean())

    def loss(self, batch, rng: torch.Generator):
        gen = self.generator
        picks = torch.randint(len(self.latents), (self.batch_size,), generator=rng).tolist()
        latents = torch.stack([self.latents[i] for i in picks]).to(gen.device)
        with torch.no_grad():
            cond = gen.encode_prompt([self.buffer_prompts[i] for i in picks])
        loss = denoising_loss(gen, latents, cond, rng).mean()
        return loss, {"loss": loss.detach().item(), "sample_reward": self.sample_reward, "kept_reward": self.kept_reward}

    def state_dict(self):
        return {"latents": list(self.latents), "prompts": list(self.buffer_prompts),
                "rng": list(self.rng.getstate()[1]), "rng_version": self.rng.getstate()[0]}

    def load_state_dict(self, state):
        self.latents = list(state["latents"])
        self.buffer_prompts = list(state["prompts"])
        self.rng.setstate((state["rng_version"], tuple(state["rng"]), None))
