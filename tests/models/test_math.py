"""The noise-process identities and stochastic steps of every family (ALGORITHMS.md §0, §7)."""

import math

import pytest
import torch

from visalign.models import load_generator

FAMILIES = ["sd", "sd-v", "sdxl", "sd3"]


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    return {family: load_generator(tiny_model_dir(family)) for family in FAMILIES}


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_target_recovers_x0_and_noise(generators, family):
    gen = generators[family]
    x0, noise = _random((6, 4, 8, 8), 0), _random((6, 4, 8, 8), 1)
    t = gen.sample_timesteps(6, generator=torch.Generator().manual_seed(2))
    x_t = gen.add_noise(x0, noise, t)
    target = gen.target(x0, noise, t)
    torch.testing.assert_close(gen.predict_x0(x_t, t, target), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(gen.predict_noise(x_t, t, target), noise, atol=2e-4, rtol=1e-4)


def test_prediction_types_follow_the_scheduler(generators):
    assert generators["sd"].prediction_type == "epsilon"
    assert generators["sd-v"].prediction_type == "v_prediction"
    assert generators["sdxl"].prediction_type == "epsilon"
    assert generators["sd3"].prediction_type == "flow" and generators["sd3"].is_flow


def test_v_target_is_a_eps_minus_s_x0(generators):
    gen = generators["sd-v"]
    x0, noise = _random((2, 4, 8, 8), 0), _random((2, 4, 8, 8), 1)
    t = torch.tensor([10, 900])
    abar = gen.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(gen.target(x0, noise, t), expected)
    torch.testing.assert_close(gen.add_noise(x0, noise, t), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_flow_identities_and_videoalign_lemma(generators):
    gen = generators["sd3"]
    x0, noise, v_hat = (_random((3, 4, 8, 8), seed) for seed in range(3))
    s = torch.tensor([0.1, 0.5, 0.9])
    x_s = gen.add_noise(x0, noise, s)
    sb = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_s, (1 - sb) * x0 + sb * noise)
    v = gen.target(x0, noise, s)
    torch.testing.assert_close(v, noise - x0)
    # ||eps - eps_hat||^2 = (1 - s)^2 ||v - v_hat||^2
    eps_hat = gen.predict_noise(x_s, s, v_hat)
    lhs = ((noise - eps_hat) ** 2).flatten(1).mean(1)
    rhs = (1 - s) ** 2 * ((v - v_hat) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-4)


def test_flow_training_timesteps_are_in_unit_interval(generators):
    gen = generators["sd3"]
    for mode in ("logit_normal", "uniform"):
        gen.timestep_sampling = mode
        s = gen.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
        assert s.min() > 0 and s.max() <= 1 and 0.3 < s.mean() < 0.7
    gen.timestep_sampling = "logit_normal"


@pytest.mark.parametrize("family", ["sd", "sd-v"])
def test_ddim_step_with_eta_matches_diffusers(generators, family):
    from diffusers import DDIMScheduler

    gen = generators[family]
    scheduler = DDIMScheduler.from_config(gen.scheduler.config)
    scheduler.set_timesteps(10)
    timesteps, next_timesteps = gen.sampling_timesteps(10)
    x_t, out = _random((2, 4, 8, 8), 0), _random((2, 4, 8, 8), 1)
    for index in (0, 5, 9):  # 9: the last step, whose previous timestep is the final alpha
        t = timesteps[index]
        ours = gen.step(x_t, t, next_timesteps[index], out, eta=1.0, generator=torch.Generator().manual_seed(3))
        theirs = scheduler.step(out, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, atol=1e-5, rtol=1e-5)
        deterministic = gen.step(x_t, t, next_timesteps[index], out, eta=0.0)
        torch.testing.assert_close(deterministic.prev_sample, scheduler.step(out, t, x_t, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)
        assert deterministic.log_prob is None


def test_ddim_log_prob_is_the_mean_gaussian_log_density(generators):
    gen = generators["sd"]
    timesteps, next_timesteps = gen.sampling_timesteps(10)
    x_t, out = _random((2, 4, 8, 8), 0), _random((2, 4, 8, 8), 1)
    result = gen.step(x_t, timesteps[3], next_timesteps[3], out, eta=1.0, generator=torch.Generator().manual_seed(0))
    z = (result.prev_sample - result.mean) / result.std
    expected = (-(z**2) / 2 - torch.log(result.std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(result.log_prob, expected, atol=1e-5, rtol=1e-5)
    assert result.log_prob.dtype == torch.float32


def test_flow_sde_step_matches_hand_computation(generators):
    gen = generators["sd3"]
    x, v = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -1.0)
    s, s_next, a = 0.6, 0.4, 0.7
    result = gen.step(x, torch.tensor(s), torch.tensor(s_next), v, eta=a, prev_sample=torch.full((1, 1, 1, 1), 0.9))
    dt = s_next - s
    std_dev = a * math.sqrt(s / (1 - s))
    mean = 0.5 * (1 + std_dev**2 / (2 * s) * dt) + (-1.0) * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt
    std = std_dev * math.sqrt(-dt)
    log_prob = -((0.9 - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert result.mean.item() == pytest.approx(mean, rel=1e-5)
    assert result.std.item() == pytest.approx(std, rel=1e-5)
    assert result.log_prob.item() == pytest.approx(log_prob, rel=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_small_eta_reduces_to_the_deterministic_step(generators, family):
    gen = generators[family]
    timesteps, next_timesteps = gen.sampling_timesteps(10)
    x_t, out = _random((2, 4, 8, 8), 0), _random((2, 4, 8, 8), 1)
    for index in (0, 4):
        t, t_next = timesteps[index], next_timesteps[index]
        deterministic = gen.step(x_t, t, t_next, out, eta=0.0).prev_sample
        nearly = gen.step(x_t, t, t_next, out, eta=1e-5, generator=torch.Generator().manual_seed(0)).prev_sample
        torch.testing.assert_close(nearly, deterministic, atol=1e-4, rtol=1e-4)
        far = gen.step(x_t, t, t_next, out, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
        assert (far - deterministic).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_transitions_reevaluate_to_the_sampling_log_prob(generators, family):
    gen = generators[family]
    eta = 0.7 if gen.is_flow else 1.0
    out = gen.sample(
        ["a red circle", "a blue square"],
        num_inference_steps=4,
        guidance_scale=3.0,
        eta=eta,
        return_trajectory=True,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    trajectory = out.trajectory
    assert trajectory.log_probs.shape == (2, 4)
    with torch.no_grad():
        for index in range(4):
            again = gen.step_log_prob(
                trajectory.latents[:, index],
                trajectory.timesteps[index],
                trajectory.next_timesteps[index],
                trajectory.latents[:, index + 1],
                out.cond,
                eta=eta,
                guidance_scale=3.0,
            )
            torch.testing.assert_close(again.log_prob, trajectory.log_probs[:, index], atol=1e-4, rtol=1e-5)
    # Under other weights the same transitions get other log-probs.
    saved = {k: v.clone() for k, v in gen.denoiser.state_dict().items()}
    try:
        with torch.no_grad():
            for p in gen.denoiser.parameters():
                p.add_(0.05 * torch.randn_like(p))
            moved = gen.step_log_prob(
                trajectory.latents[:, 1],
                trajectory.timesteps[1],
                trajectory.next_timesteps[1],
                trajectory.latents[:, 2],
                out.cond,
                eta=eta,
                guidance_scale=3.0,
            )
    finally:
        gen.denoiser.load_state_dict(saved)
    assert not torch.allclose(moved.log_prob, trajectory.log_probs[:, 1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_error_weight_converts_a_native_error_into_each_space(generators, family):
    # An error d in the denoiser's own output, read through the family's own conversions, is an
    # error in x0, in eps, in v / velocity; its squared size there is error_weight times the native one.
    from visalign.algorithms.common import per_sample_mse

    gen = generators[family]
    x0, noise, d = _random((6, 4, 8, 8), 0), _random((6, 4, 8, 8), 1), 0.1 * _random((6, 4, 8, 8), 2)
    t = gen.sample_timesteps(6, generator=torch.Generator().manual_seed(3))
    x_t = gen.add_noise(x0, noise, t)
    target = gen.target(x0, noise, t)
    out = target + d
    x0_hat, eps_hat = gen.predict_x0(x_t, t, out), gen.predict_noise(x_t, t, out)
    errors = {"native": per_sample_mse(out, target), "sample": per_sample_mse(x0_hat, x0),
              "epsilon": per_sample_mse(eps_hat, noise)}
    if gen.is_flow:
        errors["flow"] = per_sample_mse(eps_hat - x0_hat, noise - x0)
    else:
        abar = gen.alphas_cumprod[t].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        errors["v_prediction"] = per_sample_mse(a * eps_hat - s * x0_hat, a * noise - s * x0)
    assert set(errors) == set(gen.ERROR_SPACES)
    for space, error in errors.items():
        torch.testing.assert_close(error, errors["native"] * gen.error_weight(t, space), rtol=2e-3, atol=1e-7)
    with pytest.raises(ValueError, match="error space must be one of"):
        gen.error_weight(t, "v_prediction" if gen.is_flow else "flow")
