"""Diffusion-DPO / Flow-DPO (ALGORITHMS.md §1, §2.1): loss properties against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from visalign.algorithms.common import per_sample_mse
from visalign.algorithms.dpo import DiffusionDPO, DPOOptions, dpo_logits, dpo_loss_from_logits, implicit_accuracy
from visalign.config import ConfigError
from visalign.models import load_generator

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def pair_batch(generator, pairs=3, seed=0):
    size = generator.default_resolution
    g = torch.Generator().manual_seed(seed)
    return {"prompts": PROMPTS[:pairs], "winner": torch.rand(pairs, 3, size, size, generator=g),
            "loser": torch.rand(pairs, 3, size, size, generator=g), "label": torch.ones(pairs)}


def lora_generator(tiny_model_dir, family, perturb=0.0):
    generator = load_generator(tiny_model_dir(family))
    trainable = generator.add_lora(rank=2)
    if perturb:
        with torch.no_grad():
            for i, p in enumerate(trainable):
                p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return generator, trainable


def rng():
    return torch.Generator().manual_seed(123)


# ------------------------------------------------------------------ the loss as a function


def test_logits_and_loss_types_match_hand_computed_values():
    m_w, m_l, r_w, r_l = torch.tensor([0.30]), torch.tensor([0.50]), torch.tensor([0.40]), torch.tensor([0.45])
    # d_theta = -0.2, d_ref = -0.05 → z = -(beta/2)(-0.2 + 0.05) = 0.075 beta
    z = dpo_logits(m_w, m_l, r_w, r_l, beta=10.0)
    torch.testing.assert_close(z, torch.tensor([0.75]))
    torch.testing.assert_close(dpo_loss_from_logits(z, "sigmoid"), torch.tensor([math.log1p(math.exp(-0.75))]))
    torch.testing.assert_close(dpo_loss_from_logits(z, "hinge"), torch.tensor([0.25]))
    torch.testing.assert_close(dpo_loss_from_logits(z, "ipo"), torch.tensor([0.0625]))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss_from_logits(z, "kto")


def test_salesforce_beta_equals_diffusers_beta_over_two():
    g = torch.Generator().manual_seed(0)
    m_w, m_l, r_w, r_l = (torch.rand(64, generator=g) * 1e-3 for _ in range(4))
    ours = dpo_loss_from_logits(dpo_logits(m_w, m_l, r_w, r_l, beta=5000.0))
    # diffusers train_diffusion_dpo.py: -logsigmoid(beta' * (ref_diff - model_diff)), beta' = 2500
    diffusers = -F.logsigmoid(2500.0 * ((r_w - r_l) - (m_w - m_l)))
    torch.testing.assert_close(ours, diffusers, atol=1e-7, rtol=0)


def test_swapping_winner_and_loser_flips_the_logit_and_shifts_the_loss_by_z():
    g = torch.Generator().manual_seed(1)
    m_w, m_l, r_w, r_l = (torch.rand(16, generator=g) for _ in range(4))
    z = dpo_logits(m_w, m_l, r_w, r_l, 3.0)
    swapped = dpo_logits(m_l, m_w, r_l, r_w, 3.0)
    torch.testing.assert_close(swapped, -z)
    torch.testing.assert_close(dpo_loss_from_logits(z) - dpo_loss_from_logits(-z), -z)


def test_adding_a_constant_to_all_four_mses_changes_nothing():
    g = torch.Generator().manual_seed(2)
    values = [torch.rand(8, generator=g) for _ in range(4)]
    torch.testing.assert_close(dpo_logits(*values, 7.0), dpo_logits(*(v + 0.3 for v in values), 7.0))


def test_ipo_minimum_is_at_the_target_margin_one_over_beta():
    # IPO regresses h = d_ref - d_theta on 1/(2 beta') = 1/beta.
    beta = 50.0
    h = torch.linspace(-0.05, 0.05, 1001)
    loss = dpo_loss_from_logits(dpo_logits(-h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h), beta), "ipo")
    assert abs(h[loss.argmin()].item() - 1 / beta) < 1e-4


def test_a_shift_shared_by_winner_and_loser_moves_the_logit_linearly_and_sft_bounds_it():
    # docs/algorithms/dpo.md: with shared noise, m_w - m_l changes by -2 d.(r_w - r_l) for a shift d
    # of both predictions; the squares cancel, so z is linear in d (no optimum) ...
    g = torch.Generator().manual_seed(4)
    target_w, target_l, prediction, d = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(4))
    reference = per_sample_mse(prediction, target_w), per_sample_mse(prediction, target_l)

    def z(scale):
        shifted = prediction + scale * d
        return dpo_logits(per_sample_mse(shifted, target_w), per_sample_mse(shifted, target_l), *reference, 10.0).item()

    slope = z(1.0) - z(0.0)
    assert abs(slope) > 1e-3
    for scale in (-3.0, 2.0, 5.0):
        assert z(scale) - z(0.0) == pytest.approx(scale * slope, rel=1e-4, abs=1e-5)
    # ... while the winners' error (the SFT term) is quadratic in it, minimal at the winner
    sft = [per_sample_mse(prediction + scale * d, target_w).item() for scale in (0.0, 1.0, 2.0)]
    assert sft[0] - 2 * sft[1] + sft[2] > 0


def test_implicit_accuracy_counts_ties_half():
    assert implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 0.0])).item() == pytest.approx(0.5)


def test_flow_lemma_epsilon_error_is_one_minus_s_squared_times_velocity_error():
    g = torch.Generator().manual_seed(3)
    x0, eps, v_hat = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    s = torch.rand(4, generator=g).view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    eps_hat = x_s + (1 - s) * v_hat  # eps = x_s + (1 - s) v
    torch.testing.assert_close(per_sample_mse(eps_hat, eps), (1 - s.flatten()) ** 2 * per_sample_mse(v_hat, eps - x0))


# ------------------------------------------------------------------ the objective on tiny models


@pytest.mark.parametrize("family", ["sd", "sd-v", "sd3"])
def test_loss_is_ln2_when_policy_equals_reference(tiny_model_dir, family):
    generator, _ = lora_generator(tiny_model_dir, family)  # LoRA B = 0: the policy is the reference
    loss, metrics = DiffusionDPO(generator, DPOOptions(beta=5000.0)).loss(pair_batch(generator), rng())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["margin"] == 0.0 and metrics["implicit_accuracy"] == 0.5
    assert metrics["mse_winner"] == pytest.approx(metrics["ref_mse_winner"], abs=1e-7)


def test_gradient_at_init_is_beta_over_four_times_the_mse_difference_gradient(tiny_model_dir, monkeypatch):
    # At policy = reference, d(-log sigmoid z)/dz = -1/2, so grad L = (beta/4) grad mean(m_w - m_l).
    import visalign.algorithms.dpo as dpo

    generator, trainable = lora_generator(tiny_model_dir, "sd")
    captured = []
    monkeypatch.setattr(dpo, "per_sample_mse", lambda p, t: captured.append(per_sample_mse(p, t)) or captured[-1])
    beta = 40.0
    loss, _ = DiffusionDPO(generator, DPOOptions(beta=beta)).loss(pair_batch(generator), rng())
    policy = captured[0].view(-1, 2)
    expected = (beta / 4) * (policy[:, 0] - policy[:, 1]).mean()
    got = torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected, trainable, allow_unused=True)
    nonzero = 0
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
            nonzero += int(a.abs().sum() > 0)
    assert nonzero > 0


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_winner_and_loser_share_noise_and_timestep_and_each_model_runs_once(tiny_model_dir, family):
    generator, _ = lora_generator(tiny_model_dir, family, perturb=0.05)
    seen = []
    original_add_noise = generator.add_noise

    def add_noise_hook(latents, noise, t):
        seen.append((noise.clone(), t.clone()))
        return original_add_noise(latents, noise, t)

    generator.add_noise = add_noise_hook
    calls = []
    handle = generator.denoiser.register_forward_hook(lambda m, args, kwargs_or_out, *rest: calls.append(1))
    sizes = []
    pre = generator.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append((args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))).shape[0]),
        with_kwargs=True)
    try:
        DiffusionDPO(generator, DPOOptions()).loss(pair_batch(generator, pairs=3), rng())
    finally:
        handle.remove()
        pre.remove()
    (noise, t), = seen
    for pair in range(3):
        assert torch.equal(noise[2 * pair], noise[2 * pair + 1]) and torch.equal(t[2 * pair], t[2 * pair + 1])
    assert not torch.equal(noise[0], noise[2])
    assert len(calls) == 2 and sizes == [6, 6]  # policy once on 2B, reference once on 2B


def test_reference_gets_no_gradient_in_full_fine_tuning(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    generator.enable_full_finetuning(snapshot_reference=True)
    with torch.no_grad():
        for p in generator.denoiser.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    loss, metrics = DiffusionDPO(generator, DPOOptions(beta=100.0)).loss(pair_batch(generator), rng())
    loss.backward()
    reference = generator._reference_module
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert any(p.grad is not None for p in generator.denoiser.parameters())
    assert metrics["margin"] != 0.0


def test_swapping_the_pair_in_the_objective_flips_the_margin(tiny_model_dir):
    generator, _ = lora_generator(tiny_model_dir, "sd", perturb=0.05)
    batch = pair_batch(generator)
    swapped = dict(batch, winner=batch["loser"], loser=batch["winner"])
    objective = DiffusionDPO(generator, DPOOptions(beta=1000.0))
    # batch_latents encodes [winners; losers] in one call: the swap changes which posterior draw each
    # image gets, so compare with the posterior mode (cached latents) instead.
    for b in (batch, swapped):
        with torch.no_grad():
            b["cached"] = {"winner": generator.encode(b["winner"], sample=False),
                           "loser": generator.encode(b["loser"], sample=False),
                           "cond": generator.encode_prompt(b["prompts"])}
    _, forward = objective.loss(batch, rng())
    _, backward = objective.loss(swapped, rng())
    assert forward["margin"] == pytest.approx(-backward["margin"], rel=1e-4, abs=1e-6)
    assert forward["margin"] != 0


def test_derived_flow_schedule_gives_zero_gradient_at_pure_noise(tiny_model_dir):
    generator, trainable = lora_generator(tiny_model_dir, "sd3", perturb=0.05)
    generator.sample_timesteps = lambda n, generator=None: torch.ones(n)
    loss, metrics = DiffusionDPO(generator, DPOOptions(beta=500.0, beta_schedule="derived")).loss(
        pair_batch(generator), rng())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    with pytest.raises(ConfigError, match="flow models only"):
        DiffusionDPO(load_generator(tiny_model_dir("sd")), DPOOptions(beta_schedule="derived"))


def test_sft_term_and_soft_labels(tiny_model_dir):
    generator, _ = lora_generator(tiny_model_dir, "sd")
    batch = pair_batch(generator)
    plain, metrics = DiffusionDPO(generator, DPOOptions()).loss(batch, rng())
    with_sft, _ = DiffusionDPO(generator, DPOOptions(sft_weight=0.5)).loss(batch, rng())
    assert with_sft.item() == pytest.approx(plain.item() + 0.5 * metrics["mse_winner"], rel=1e-6)
    # A tie (label 0.5) at policy = reference is still ln 2; hinge refuses soft labels.
    tied = dict(batch, label=torch.tensor([1.0, 0.5, 1.0]))
    assert DiffusionDPO(generator, DPOOptions()).loss(tied, rng())[0].item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="loss_type=sigmoid"):
        DiffusionDPO(generator, DPOOptions(loss_type="hinge")).loss(tied, rng())


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_error_space_sample_compares_the_implied_clean_latents(tiny_model_dir, family):
    # error_space=sample: the DPO logit from the x0 errors of policy and reference, by hand.
    from visalign.algorithms.common import paired_noising, prompt_dropout_mask

    generator, _ = lora_generator(tiny_model_dir, family, perturb=0.05)
    g = torch.Generator().manual_seed(5)
    winners, losers = (torch.randn(generator.latent_shape(3), generator=g) for _ in range(2))
    batch = dict(pair_batch(generator), cached={"winner": winners, "loser": losers,
                                                "cond": generator.encode_prompt(PROMPTS)})
    beta = 30.0
    loss, metrics = DiffusionDPO(generator, DPOOptions(beta=beta, error_space="sample")).loss(batch, rng())

    r = rng()
    prompt_dropout_mask(3, 0.0, r)
    latents = torch.stack([winners, losers], dim=1).flatten(0, 1)
    x_t, _, t, _ = paired_noising(generator, latents, 2, r)
    cond = generator.encode_prompt(PROMPTS).repeat_interleave(2)
    with torch.no_grad():
        policy = per_sample_mse(generator.predict_x0(x_t, t, generator.predict(x_t, t, cond)), latents).view(3, 2)
        reference = per_sample_mse(generator.predict_x0(x_t, t, generator.reference().predict(x_t, t, cond)),
                                   latents).view(3, 2)
    z = -0.5 * beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))  # Salesforce beta
    assert z.abs().max() > 1e-3  # the perturbed policy differs from the reference
    assert loss.item() == pytest.approx(-F.logsigmoid(z).mean().item(), rel=1e-4)
    assert metrics["mse_winner"] == pytest.approx(policy[:, 0].mean().item(), rel=1e-4)
    native, _ = DiffusionDPO(generator, DPOOptions(beta=beta)).loss(batch, rng())
    assert native.item() != pytest.approx(loss.item(), rel=1e-3)
    with pytest.raises(ConfigError, match="error_space must be one of"):
        DiffusionDPO(generator, DPOOptions(error_space="v_prediction" if family == "sd3" else "flow"))
    # checked without a model too (config validation: any family's space)
    DiffusionDPO(None, DPOOptions(error_space="flow"))
    with pytest.raises(ConfigError, match="error_space must be one of"):
        DiffusionDPO(None, DPOOptions(error_space="x0"))
