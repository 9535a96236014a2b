"""Diffusion-KTO (ALGORITHMS.md §14) and Flow-RWR (§2.2): loss properties against hand-computed values."""

import math
import os

import pytest
import torch

from visalign.algorithms.kto import DiffusionKTO, KTOOptions, kto_loss, kto_reference_point
from visalign.algorithms.rwr import RewardWeightedRegression, RWROptions, rwr_weights
from visalign.algorithms.sft import SFT
from visalign.config import ConfigError
from visalign.models import load_generator


def rng():
    return torch.Generator().manual_seed(7)


def images(generator, n, seed=0):
    size = generator.default_resolution
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ KTO


def test_kto_hand_computed_value():
    policy = torch.tensor([0.2, 0.5, 0.4])
    reference = torch.tensor([0.3, 0.4, 0.4])
    desirable = torch.tensor([True, False, True])
    # g = [0.1, -0.1, 0]; mean 0 → z0 = 0; h = sigmoid(beta * sgn * g) with beta = 10
    loss, parts = kto_loss(policy, reference, desirable, beta=10.0, lambda_desirable=2.0)
    h = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-1.0)), 0.5]
    expected = (2 * (1 - h[0]) + 1 * (1 - h[1]) + 2 * (1 - h[2])) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["reference_point"].item() == pytest.approx(0.0, abs=1e-7)
    # The reference point is clamped at zero from below and follows positive means.
    assert kto_reference_point(torch.tensor([0.3, 0.1])).item() == pytest.approx(0.2)
    assert kto_reference_point(torch.tensor([-0.3, 0.1])).item() == 0.0


def test_kto_gradient_lowers_desirable_and_raises_undesirable_mse_and_skips_the_reference_point():
    policy = torch.tensor([0.30, 0.30, 0.25, 0.35], requires_grad=True)
    reference = torch.tensor([0.31, 0.29, 0.26, 0.33])
    desirable = torch.tensor([True, True, False, False])
    loss, parts = kto_loss(policy, reference, desirable, beta=50.0)
    assert not parts["reference_point"].requires_grad
    loss.backward()
    assert (policy.grad[:2] > 0).all()  # gradient descent lowers the desirable samples' MSE
    assert (policy.grad[2:] < 0).all()  # and raises the undesirable ones'
    # Without the z0 path the gradient is exactly lambda * beta * sgn * h (1 - h) / B per sample.
    g = reference - policy.detach()
    z0 = parts["reference_point"]
    sign = desirable.float() * 2 - 1
    h = torch.sigmoid(50.0 * sign * (g - z0))
    torch.testing.assert_close(policy.grad, 50.0 * sign * h * (1 - h) / 4)


@pytest.mark.parametrize("data", ["feedback", "pair"])
def test_kto_loss_is_half_lambda_at_init(tiny_model_dir, data):
    generator = load_generator(tiny_model_dir("sd"))
    generator.add_lora(rank=2)  # B = 0: policy = reference
    if data == "feedback":
        batch = {"prompts": ["a red circle"] * 4, "images": images(generator, 4), "labels": torch.tensor([1., 0, 1, 0])}
    else:
        batch = {"prompts": ["a red circle", "a blue square"], "winner": images(generator, 2),
                 "loser": images(generator, 2, seed=1)}
    loss, metrics = DiffusionKTO(generator, KTOOptions(lambda_desirable=3.0, lambda_undesirable=3.0)).loss(batch, rng())
    assert loss.item() == pytest.approx(0.5 * 3.0, abs=1e-6)
    assert metrics["reference_point"] == 0.0


def _reference_point_worker(rank, world, init_file, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.tensor([0.1, 0.2]) if rank == 0 else torch.tensor([0.6, 0.7])
    results[rank] = kto_reference_point(g).item()
    torch.distributed.destroy_process_group()


def test_kto_reference_point_is_the_global_mean_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_reference_point_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    # Rank means are 0.15 and 0.65; the global mean 0.4 is what both ranks must use.
    assert results[0] == pytest.approx(0.4) and results[1] == pytest.approx(0.4)


# ------------------------------------------------------------------ RWR


def test_rwr_weights_paper_and_normalised():
    r = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(rwr_weights(r), r.exp())
    torch.testing.assert_close(rwr_weights(r, temperature=2.0), (r / 2).exp())
    normalised = rwr_weights(r, normalize="batch")
    torch.testing.assert_close(normalised, torch.softmax(r, 0) * 3)
    assert normalised.sum().item() == pytest.approx(3.0)
    huge = torch.tensor([1000.0, 999.0])
    assert torch.isfinite(rwr_weights(huge, normalize="batch")).all()
    with pytest.raises(FloatingPointError, match="temperature"):
        rwr_weights(huge)


def test_rwr_with_constant_reward_is_exp_r_times_the_sft_gradient(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    trainable = generator.add_lora(rank=2)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    pictures = images(generator, 3)
    ranking = {"prompts": ["a red circle", "a blue square", "a green triangle"], "images": pictures[:, None],
               "scores": torch.full((3, 1), 0.7), "mask": torch.ones(3, 1, dtype=torch.bool)}
    rwr, _ = RewardWeightedRegression(generator, RWROptions()).loss(ranking, rng())
    sft, _ = SFT(generator).loss({"prompts": ranking["prompts"], "images": pictures}, rng())
    assert rwr.item() == pytest.approx(math.exp(0.7) * sft.item(), rel=1e-5)
    rwr_grads = torch.autograd.grad(rwr, trainable, allow_unused=True)
    sft_grads = torch.autograd.grad(sft, trainable, allow_unused=True)
    for a, b in zip(rwr_grads, sft_grads):
        if a is not None:
            torch.testing.assert_close(a, math.exp(0.7) * b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_rwr_uses_only_real_images_of_ragged_rankings(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    generator.add_lora(rank=2)
    ranking = {"prompts": ["a red circle", "a blue square"], "images": images(generator, 4).view(2, 2, 3, *[generator.default_resolution] * 2),
               "scores": torch.tensor([[1.0, 0.0], [2.0, 0.0]]), "mask": torch.tensor([[True, True], [True, False]])}
    loss, metrics = RewardWeightedRegression(generator, RWROptions()).loss(ranking, rng())
    assert metrics["reward_mean"] == pytest.approx(1.0)  # (1 + 0 + 2) / 3: the padded slot is ignored
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="normalize"):
        RewardWeightedRegression(generator, RWROptions(normalize="softmax"))


def test_objectives_declare_their_data(tiny_model_dir):
    assert DiffusionKTO.data_kinds == ("feedback", "pair") and RewardWeightedRegression.data_kinds == ("ranking",)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
