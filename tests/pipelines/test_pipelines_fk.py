"""FK steering on every family (tiny SD, SD-v, SDXL, SD3 and a video-shaped flow generator)."""

from __future__ import annotations

import json

import pytest
import torch
from steering_toys import brightness, redness

import rewards
from pipelines import FKSteering, LatentReward
from rewards import FunctionReward

FAMILIES = ["sd", "sd-v", "sdxl", "sd3", "video"]
PROMPTS = ["a red circle", "two blue squares"]


def image_reward(family):
    if family == "video":
        return rewards.FrameAverage(FunctionReward(brightness, name="brightness", differentiable=True))
    return FunctionReward(redness, name="redness", differentiable=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_reproduces_plain_sampling(tiny_generator, family):
    generator = tiny_generator(family)
    steer = FKSteering(generator, image_reward(family), num_particles=3, lmbda=0.0, resample_start=0, resample_every=1)
    out = steer(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    plain = generator.sample(PROMPTS, num_inference_steps=3, guidance_scale=3.0, eta=steer.eta,
                             num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.latents.flatten(0, 1), plain.latents)
    assert torch.equal(out.particles.flatten(0, 1), plain.images)
    events = out.diagnostics.events
    assert [e["index"] for e in events] == [0, 1, 2]
    for event in events:
        assert event["ess"] == pytest.approx([3.0, 3.0])
        assert event["ancestors"] == [[0, 1, 2], [0, 1, 2]]
    shape = plain.images.shape[1:]
    assert out.images.shape == (2, *shape) and out.particles.shape == (2, 3, *shape)
    assert out.rewards.shape == (2,) and out.particle_rewards.shape == (2, 3)


def test_resampling_never_mixes_prompts(tiny_generator):
    # The toy video model's samples of a prompt sit around that prompt's mean; a global
    # resampling would copy the brightest particles of one prompt into the others' groups.
    generator = tiny_generator("video")
    prompts = ["p0", "p1", "p2"]
    steer = FKSteering(generator, image_reward("video"), num_particles=6, lmbda=200.0, resample_start=0, resample_every=1)
    out = steer(prompts, num_inference_steps=6, generator=torch.Generator().manual_seed(1))
    assert out.diagnostics.num_resampling_events > 0
    means = generator.denoiser.means(generator.encode_prompt(prompts).prompt_embeds[:, 0]).detach()
    distances = torch.cdist(out.latents.flatten(2).flatten(0, 1), means)  # [P * k, P]
    owner = distances.argmin(dim=1).view(3, 6)
    assert torch.equal(owner, torch.arange(3)[:, None].expand(3, 6))
    for event in out.diagnostics.events:
        assert all(0 <= a < 6 for row in event["ancestors"] for a in row)


def test_fk_raises_the_reward_of_an_exact_model(tiny_generator):
    generator = tiny_generator("video")
    reward = image_reward("video")
    prompts = [f"prompt {i}" for i in range(6)]
    # The brightness of a clip varies little between samples (std ~0.004), hence the large lambda.
    steer = FKSteering(generator, reward, num_particles=8, lmbda=2000.0, potential="max", resample_start=1, resample_every=1)
    out = steer(prompts, num_inference_steps=8, generator=torch.Generator().manual_seed(2))
    plain = generator.sample(prompts, num_inference_steps=8, eta=steer.eta, num_images_per_prompt=8,
                             generator=torch.Generator().manual_seed(2))
    plain_reward = reward(plain.images, [p for p in prompts for _ in range(8)]).view(6, 8)
    spread = plain_reward.std(dim=1).mean()
    assert out.particle_rewards.mean() > plain_reward.mean() + spread  # about +1.9 std over seeds 0-4
    assert (out.rewards >= out.particle_rewards.max(dim=1).values - 1e-6).all()


def test_deterministic_sampler_with_several_particles_warns(tiny_generator):
    steer = FKSteering(tiny_generator("sd"), image_reward("sd"), num_particles=2, eta=0.0)
    with pytest.warns(UserWarning, match="deterministic sampler"):
        steer(PROMPTS[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_large_lambda_with_negative_rewards_stays_finite(tiny_generator):
    negative = FunctionReward(lambda images, prompts: -1000 * (1 + images.flatten(1).mean(1)), name="negative")
    steer = FKSteering(tiny_generator("sd3"), negative, num_particles=4, lmbda=10.0, potential="max",
                       resample_start=0, resample_every=1)
    out = steer(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.particles).all() and torch.isfinite(out.particle_rewards).all()
    for event in out.diagnostics.events:
        assert all(1.0 - 1e-6 <= e <= 4.0 + 1e-6 for e in event["ess"])
    assert all(w is not None and w == w for row in out.diagnostics.final_log_weights for w in row)


def test_diagnostics_are_json_and_count_the_costs(tiny_generator):
    steer = FKSteering(tiny_generator("sd"), image_reward("sd"), num_particles=2, resample_start=1, resample_end=3, resample_every=2)
    out = steer(PROMPTS, num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    diagnostics = out.diagnostics
    assert diagnostics.options["schedule"] == [1, 3, 4]
    assert [e["index"] for e in diagnostics.events] == [1, 3, 4]
    assert diagnostics.denoiser_evals == 5 * 2 * 2 * 2  # steps x prompts x particles x CFG branches
    assert diagnostics.reward_evals == 3 * 2 * 2
    assert len(diagnostics.ess) == 3 and len(diagnostics.ess[0]) == 2
    json.dumps(diagnostics.to_dict(), allow_nan=True)


def test_reward_library_combinations_and_the_personal_reward(tiny_generator):
    from rewards.tiny import tiny_personal_reward

    generator = tiny_generator("sd")
    combined = rewards.WeightedSum({"red": FunctionReward(redness, name="red"),
                                    "bright": FunctionReward(brightness, name="bright")}, weights=[1.0, 0.5])
    out = FKSteering(generator, combined, num_particles=2)(PROMPTS, num_inference_steps=2,
                                                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.particle_rewards).all()
    personal = tiny_personal_reward(seed=0)
    user = torch.randn(personal.backbone.embed_dim)
    steer = FKSteering(generator, personal, num_particles=2, reward_context={"user_embedding": user})
    out = steer(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.particle_rewards).all() and out.particle_rewards.abs().max() <= 1.0 + 1e-5


def test_per_prompt_reward_context_reaches_every_particle_and_x0_draw(tiny_generator):
    """``prompt_context``: one user per prompt; every scored row sees its own prompt's user, in FK
    (intermediate x0 draws, the final step, prompt chunks) and in best-of-N."""
    from pipelines import BestOfN

    seen = []

    def by_user(images, prompts, user_id):
        seen.append((list(prompts), user_id.tolist()))
        return images.mean((1, 2, 3)) * user_id.float()

    reward = FunctionReward(by_user, name="by-user", differentiable=True)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    users = torch.tensor([10, 20, 30])
    owner = dict(zip(prompts, users.tolist()))
    steer = FKSteering(tiny_generator("sd"), reward, num_particles=2, num_x0_samples=2, resample_start=0,
                       resample_every=1, prompt_batch_size=2)
    out = steer(prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                prompt_context={"user_id": users})
    assert torch.isfinite(out.particle_rewards).all() and len(seen) == 2 * 3  # 2 chunks x (2 x0 steps + final)
    BestOfN(tiny_generator("sd"), reward, n=2, batch_size=2)(prompts, num_inference_steps=2,
                                                             prompt_context={"user_id": users})
    for texts, ids in seen:
        assert ids == [owner[text] for text in texts]
    with pytest.raises(ValueError, match="one entry per prompt"):
        steer(prompts, num_inference_steps=2, prompt_context={"user_id": users[:2]})


def test_several_x0_samples_and_prompt_chunks(tiny_generator):
    generator = tiny_generator("sd3")
    reward = image_reward("sd3")
    whole = FKSteering(generator, reward, num_particles=2, lmbda=0.0, num_x0_samples=3, resample_start=1, resample_end=1)
    out = whole(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    plain = generator.sample(PROMPTS, num_inference_steps=3, eta=whole.eta, num_images_per_prompt=2,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.latents.flatten(0, 1), plain.latents)  # the x0 draws use their own stream
    assert out.diagnostics.reward_evals == 3 * 4 * 1 + 4  # one scheduled step x m draws, then the final
    chunked = FKSteering(generator, reward, num_particles=2, prompt_batch_size=1)(
        PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert chunked.particles.shape == out.particles.shape
    assert [e["prompt_offset"] for e in chunked.diagnostics.events if e["final"]] == [0, 1]


def test_guided_proposal_with_weight_correction(tiny_generator):
    generator = tiny_generator("video")
    reward = image_reward("video")
    steer = FKSteering(generator, reward, num_particles=4, lmbda=20.0, guidance=2.0, resample_start=1, resample_every=2)
    out = steer(["a", "b"], num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.particle_rewards).all()
    assert all(e == e for event in out.diagnostics.events for e in event["ess"])
    guided_steps = [e for e in out.diagnostics.options["guidance_events"] if not e["skipped"]]
    assert len(guided_steps) == 5  # every step but the singular s = 1


def test_from_a_diffusers_pipeline_in_three_lines(tiny_generator):
    pipe = tiny_generator("sd").pipe  # a diffusers StableDiffusionPipeline
    steer = FKSteering.from_pipeline(pipe, FunctionReward(redness, name="redness"), num_particles=2)
    images = steer("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)
    pil = steer("a red circle", num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (32, 32)
    with pytest.raises(TypeError, match="cannot steer a str"):
        FKSteering.from_pipeline("not a pipeline", redness)


def test_bad_arguments_are_refused_by_name(tiny_generator):
    generator = tiny_generator("sd")
    with pytest.raises(TypeError, match="unknown FK option"):
        FKSteering(generator, redness, particles=4)
    with pytest.raises(ValueError, match="unknown potential"):
        FKSteering(generator, redness, potential="sum")
    with pytest.raises(ValueError, match="lmbda"):
        FKSteering(generator, redness, lmbda=-1.0)
    with pytest.raises(KeyError, match="unknown reward 'no-such-reward'"):
        FKSteering(generator, "no-such-reward")

    class Linear(LatentReward):
        def forward(self, latents, t, prompts):
            return latents.flatten(1).sum(1)

    with pytest.raises(ValueError, match="LatentReward"):
        FKSteering(generator, Linear())
    with pytest.raises(ValueError, match="latents have batch"):
        FKSteering(generator, redness, num_particles=2)(PROMPTS, num_inference_steps=2, latents=torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match="no prompts"):
        FKSteering(generator, redness)([], num_inference_steps=2)
