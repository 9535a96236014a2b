"""The FK particle bookkeeping on toy chains: potentials, log-space weights, ESS, resampling."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.smc import POTENTIALS, ParticleWeights, effective_sample_size, log_potential, resample_indices


def run_chain(potential, lmbda, rewards, adaptive=False, weighting="incremental", resampling="multinomial", seed=0):
    """Feed rewards ``[T, P, k]`` (the last row is r(x0)) through ParticleWeights, tracking each
    surviving path's applied potentials independently of the class's own bookkeeping."""
    steps, groups, k = rewards.shape
    weights = ParticleWeights(groups, k, potential, lmbda, weighting=weighting, resampling=resampling)
    rng = torch.Generator().manual_seed(seed)
    applied = torch.zeros(groups, k, dtype=torch.float64)
    identity = torch.arange(k)
    # which original chain each particle's reward row comes from, after resamplings
    lineage = identity.repeat(groups, 1)
    updates = []
    for step in range(steps):
        final = step == steps - 1
        current = rewards[step].gather(1, lineage)
        update = weights.update(current, final=final, adaptive=adaptive and not final, generator=rng)
        used = update.resampled[:, None] if weighting == "incremental" else torch.ones(groups, 1, dtype=torch.bool)
        applied = torch.where(used, applied + update.log_potentials, applied).gather(1, update.ancestors)
        lineage = lineage.gather(1, update.ancestors)
        updates.append(update)
    final_rewards = rewards[-1].gather(1, lineage)
    return weights, updates, applied, final_rewards


@pytest.mark.parametrize("potential", POTENTIALS)
def test_lambda_zero_gives_uniform_weights_full_ess_and_no_resampling(potential):
    rewards = torch.randn(6, 3, 4)
    _, updates, _, _ = run_chain(potential, 0.0, rewards)
    for update in updates:
        assert torch.allclose(update.log_weights.exp(), torch.full((3, 4), 0.25, dtype=torch.float64))
        assert torch.allclose(update.ess, torch.full((3,), 4.0, dtype=torch.float64))
        assert torch.equal(update.ancestors, torch.arange(4).repeat(3, 1))


@pytest.mark.parametrize("weighting", ["incremental", "accumulated"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("potential", POTENTIALS)
def test_product_of_applied_potentials_along_a_surviving_path_is_exp_lambda_r_x0(potential, adaptive, weighting):
    torch.manual_seed(0)
    rewards = torch.randn(8, 3, 5).double() * 2 - 1  # negative and positive rewards
    weights, updates, applied, final_rewards = run_chain(potential, 2.0, rewards, adaptive=adaptive, weighting=weighting)
    assert torch.allclose(applied, 2.0 * final_rewards, atol=1e-9)
    assert torch.allclose(weights.log_path, 2.0 * final_rewards, atol=1e-9)
    if adaptive:  # some evaluations skipped resampling, so the modes were exercised
        assert not all(bool(u.resampled.all()) for u in updates[:-1])


def test_diff_potential_telescopes_without_the_final_correction():
    rewards = torch.randn(5, 2, 3).double()
    previous = torch.zeros(2, 3, dtype=torch.float64)
    total = torch.zeros(2, 3, dtype=torch.float64)
    for step in range(5):
        log_g, previous = log_potential("diff", 3.0, rewards[step], previous)
        total += log_g
    assert torch.allclose(total, 3.0 * rewards[-1])


def test_max_potential_keeps_negative_rewards():
    # r_prev starts at -inf, not 0, so max(r, r_prev) is never clamped up to 0.
    log_g, running = log_potential("max", 1.0, torch.tensor([[-3.0, -1.0]]), torch.full((1, 2), -math.inf))
    assert running.tolist() == [[-3.0, -1.0]]
    assert log_g.tolist() == [[-3.0, -1.0]]


@pytest.mark.parametrize("potential", POTENTIALS)
def test_large_lambda_and_negative_rewards_stay_finite(potential):
    rewards = -500 * torch.rand(10, 4, 8).double() - 100  # exp(10 * r) underflows, exp(-10 r) overflows
    rewards[3] *= -1  # and a step of large positive rewards
    _, updates, applied, final_rewards = run_chain(potential, 10.0, rewards)
    for update in updates:
        assert torch.isfinite(update.log_weights).any(dim=1).all()
        assert not torch.isnan(update.log_weights).any()
        assert torch.isfinite(update.ess).all() and (update.ess >= 1 - 1e-9).all() and (update.ess <= 8 + 1e-9).all()
        assert (update.ancestors >= 0).all() and (update.ancestors < 8).all()
    assert torch.allclose(applied, 10.0 * final_rewards)


def test_resampling_stays_inside_each_group_and_only_permutes_and_duplicates():
    groups, k = 6, 5
    log_weights = torch.randn(groups, k) * 5
    for method in ("multinomial", "systematic"):
        ancestors = resample_indices(log_weights, method, torch.Generator().manual_seed(1))
        assert ancestors.shape == (groups, k) and ancestors.dtype == torch.long
        assert (ancestors >= 0).all() and (ancestors < k).all()
        again = resample_indices(log_weights, method, torch.Generator().manual_seed(1))
        assert torch.equal(ancestors, again)  # a fixed seed gives the same draw


def test_a_dominant_particle_takes_over_its_group_only():
    weights = ParticleWeights(2, 4, "immediate", lmbda=10.0)
    rewards = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    update = weights.update(rewards, generator=torch.Generator().manual_seed(0))
    assert update.ancestors[0].tolist() == [2, 2, 2, 2]
    assert update.ancestors[1].tolist() == [0, 1, 2, 3]  # uniform group untouched


def test_systematic_resampling_of_uniform_weights_is_the_identity():
    ancestors = resample_indices(torch.zeros(3, 7), "systematic", torch.Generator().manual_seed(0))
    assert torch.equal(ancestors, torch.arange(7).repeat(3, 1))


def test_ess_matches_its_definition_at_any_scale():
    log_weights = torch.randn(4, 6).double()
    expected = 1 / (torch.softmax(log_weights, dim=1) ** 2).sum(dim=1)
    assert torch.allclose(effective_sample_size(log_weights), expected)
    assert torch.allclose(effective_sample_size(log_weights + 1e4), expected)


def test_non_finite_rewards_get_zero_weight_and_are_counted():
    weights = ParticleWeights(2, 3, "diff", lmbda=1.0)
    rewards = torch.tensor([[float("nan"), 0.5, float("inf")], [0.1, 0.2, 0.3]])
    update = weights.update(rewards, generator=torch.Generator().manual_seed(0))
    assert update.invalid == 2
    assert update.log_weights[0, 0] == -math.inf and update.log_weights[0, 2] == -math.inf
    assert update.ancestors[0].tolist() == [1, 1, 1]
    with pytest.warns(RuntimeWarning, match="no particle with a finite weight"):
        weights.update(torch.full((2, 3), float("nan")), generator=torch.Generator().manual_seed(0))


def test_adaptive_resamples_only_degenerate_groups():
    weights = ParticleWeights(2, 4, "immediate", lmbda=10.0, ess_threshold=0.5)
    rewards = torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.01, 0.0, 0.01]])
    update = weights.update(rewards, adaptive=True, generator=torch.Generator().manual_seed(0))
    assert update.resampled.tolist() == [True, False]
    assert update.ancestors[1].tolist() == [0, 1, 2, 3]


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown potential 'sum'"):
        ParticleWeights(1, 2, "sum")
    with pytest.raises(ValueError, match="lmbda"):
        ParticleWeights(1, 2, lmbda=float("inf"))
    with pytest.raises(ValueError, match="expected \\(1, 2\\)"):
        ParticleWeights(1, 2).update(torch.zeros(2, 1))
