"""Best-of-N: the FK baseline with the same outputs and cost accounting."""

from __future__ import annotations

import pytest
import torch
from steering_toys import redness

from pipelines import BestOfN, FKSteering
from rewards import FunctionReward


def test_best_of_n_keeps_the_highest_reward_of_plain_samples(tiny_generator):
    generator = tiny_generator("sd")
    reward = FunctionReward(redness, name="redness")
    prompts = ["a red circle", "a blue square"]
    out = BestOfN(generator, reward, n=3)(prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    plain = generator.sample(prompts, num_inference_steps=3, num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.particles.flatten(0, 1), plain.images)
    expected = reward(plain.images, [p for p in prompts for _ in range(3)]).view(2, 3)
    assert torch.allclose(out.particle_rewards, expected)
    assert torch.equal(out.rewards, expected.max(dim=1).values)
    best = expected.argmax(dim=1)
    assert torch.equal(out.images, plain.images.view(2, 3, 3, 32, 32)[torch.arange(2), best])


def test_same_compute_accounting_as_fk(tiny_generator):
    generator = tiny_generator("sd3")
    reward = FunctionReward(redness, name="redness")
    bon = BestOfN(generator, reward, n=4, batch_size=1)(["a", "b"], num_inference_steps=4, guidance_scale=2.0)
    fk = FKSteering(generator, reward, num_particles=4)(["a", "b"], num_inference_steps=4, guidance_scale=2.0)
    assert bon.diagnostics.denoiser_evals == fk.diagnostics.denoiser_evals == 4 * 2 * 4 * 2
    assert bon.diagnostics.reward_evals == 8 and fk.diagnostics.reward_evals > 8
    assert bon.particles.shape == fk.particles.shape


def test_bad_arguments(tiny_generator):
    with pytest.raises(ValueError, match="n must be >= 1"):
        BestOfN(tiny_generator("sd"), redness, n=0)
    with pytest.raises(ValueError, match="latents have batch"):
        BestOfN(tiny_generator("sd"), redness, n=2)(["a"], num_inference_steps=2, latents=torch.zeros(3, 4, 8, 8))
