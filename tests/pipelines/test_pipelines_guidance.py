"""Reward-gradient guidance: Flow-NRG (flow) and its DDPM analogue, on every family."""

from __future__ import annotations

import pytest
import torch
from steering_toys import brightness, redness

import rewards
from pipelines import GuidanceOptions, LatentReward, RewardGuidance
from rewards import FunctionReward

FAMILIES = ["sd", "sd-v", "sdxl", "sd3", "video"]


class LinearLatentReward(LatentReward):
    """``r(x) = <direction, x>``: its gradient is ``direction`` everywhere."""

    def __init__(self, direction):
        super().__init__()
        self.register_buffer("direction", direction)

    def forward(self, latents, t, prompts, **context):
        return (latents.float() * self.direction).flatten(1).sum(1)


def image_reward(family):
    if family == "video":
        return rewards.FrameAverage(FunctionReward(brightness, name="brightness", differentiable=True))
    return FunctionReward(redness, name="redness", differentiable=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_scale_reproduces_unguided_sampling_exactly(tiny_generator, family):
    generator = tiny_generator(family)
    prompts = ["a red circle", "a blue square"]
    guided = RewardGuidance(generator, image_reward(family), scale=0.0)
    eta = 0.5 if family in ("sd3", "video") else 0.0
    out = guided(prompts, num_inference_steps=3, guidance_scale=3.0, eta=eta, generator=torch.Generator().manual_seed(0))
    plain = generator.sample(prompts, num_inference_steps=3, guidance_scale=3.0, eta=eta,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.latents.flatten(0, 1), plain.latents)
    assert any(not e["skipped"] for e in guided.events)  # the gradient was computed, then scaled by 0


@pytest.mark.parametrize("family", ["sd", "sd-v", "sd3", "video"])
def test_linear_latent_reward_moves_one_step_along_its_gradient(tiny_generator, family):
    generator = tiny_generator(family)
    torch.manual_seed(0)
    shape = generator.latent_shape(2)
    direction = torch.randn(shape[1:])
    guidance = RewardGuidance(generator, LinearLatentReward(direction), scale=0.1)
    timesteps, next_timesteps = generator.sampling_timesteps(4)
    t, t_next = timesteps[1], next_timesteps[1]  # a middle step (the flow's first, s = 1, is singular)
    x_t = torch.randn(shape)
    prompts = ["a", "b"]
    with torch.no_grad():
        cond = generator.encode_prompt(prompts)
        out = generator.guided_prediction(x_t, t, cond)
    guided_out = guidance.guide(x_t, t, out, prompts, cond)
    unguided = generator.step(x_t, t, t_next, out).prev_sample
    guided = generator.step(x_t, t, t_next, guided_out).prev_sample
    moved = (guided - unguided).flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(moved, direction.flatten().double()[None].expand_as(moved), dim=1)
    assert (cosine > 0.999).all(), cosine


def test_flow_nrg_velocity_matches_the_paper_formula(tiny_generator):
    # v~ = v - w (s / (1 - s)) grad r  (VideoAlign Eq. 11)
    generator = tiny_generator("sd3")
    direction = torch.randn(generator.latent_shape(1)[1:])
    guidance = RewardGuidance(generator, LinearLatentReward(direction), scale=3.0)
    x_t, v = torch.randn(generator.latent_shape(1)), torch.randn(generator.latent_shape(1))
    s = torch.tensor(0.6)
    guided = guidance.guide(x_t, s, v, ["a"])
    assert torch.allclose(guided, v - 3.0 * (0.6 / 0.4) * direction, atol=1e-5)
    capped = RewardGuidance(generator, LinearLatentReward(direction), scale=3.0, max_factor=1.0).guide(x_t, s, v, ["a"])
    assert torch.allclose(capped, v - 3.0 * 1.0 * direction, atol=1e-5)


def test_the_flow_skips_the_singular_first_step(tiny_generator):
    guidance = RewardGuidance(tiny_generator("sd3"), image_reward("sd3"), scale=1.0)
    guidance(["a red circle"], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert [e["skipped"] for e in guidance.events] == [True, False, False]
    assert guidance.events[0]["t"] == 1.0


@pytest.mark.parametrize("through_denoiser", [False, True])
def test_image_reward_gradient_raises_the_reward_of_the_x0_prediction(tiny_generator, through_denoiser):
    generator = tiny_generator("sd")
    reward = image_reward("sd")
    guidance = RewardGuidance(generator, reward, scale=20.0, through_denoiser=through_denoiser)
    prompts = ["a", "b"]
    guidance.prepare(prompts)
    t = generator.sampling_timesteps(10)[0][5]
    x_t = torch.randn(generator.latent_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = generator.encode_prompt(prompts)
        out = generator.guided_prediction(x_t, t, cond)
        guided = guidance.guide(x_t, t, out, prompts, cond)
        before = reward(generator.decode(generator.predict_x0(x_t, t, out)), prompts)
        after = reward(generator.decode(generator.predict_x0(x_t, t, guided)), prompts)
    assert (after > before).all(), (before, after)


def test_guided_sampling_raises_the_reward_of_the_toy_video_model(tiny_generator):
    generator = tiny_generator("video")
    reward = image_reward("video")
    prompts = [f"p{i}" for i in range(4)]
    plain = generator.sample(prompts, num_inference_steps=6, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    out = RewardGuidance(generator, reward, scale=200.0)(prompts, num_inference_steps=6, guidance_scale=1.0,
                                                        generator=torch.Generator().manual_seed(0))
    assert (out.rewards > reward(plain.images, prompts) + 0.01).all()
    assert out.images.shape == plain.images.shape  # [P, F, 3, H, W]


def test_non_differentiable_rewards_are_refused(tiny_generator):
    oracle = rewards.load("testbed-oracle")
    with pytest.raises(ValueError, match="not differentiable"):
        RewardGuidance(tiny_generator("sd"), oracle)
    with pytest.raises(TypeError, match="unknown guidance option"):
        RewardGuidance(tiny_generator("sd"), redness, strength=1.0)
    with pytest.raises(ValueError, match="max_factor"):
        GuidanceOptions(max_factor=0.0)
