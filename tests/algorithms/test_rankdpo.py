"""RankDPO (ALGORITHMS.md §3.2): the ranked loss against hand-computed values and Diffusion-DPO,
pair weights, gradients, shared noise, chunked reference, and training on a synth-layout data set."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from visalign.algorithms.dpo import DiffusionDPO, DPOOptions, dpo_logits, dpo_loss_from_logits
from visalign.algorithms.rankdpo import RankDPO, RankDPOOptions, dcg_pair_weights, rank_positions, rankdpo_loss
from visalign.config import ConfigError
from visalign.models import load_generator

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def rng():
    return torch.Generator().manual_seed(123)


def random_mses(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


# ------------------------------------------------------------------ the loss as a function


def test_k2_with_unit_weight_equals_diffusion_dpo_at_the_same_beta():
    policy, reference = random_mses((16, 2), 0)
    phi = torch.tensor([[1.0, 0.0]]).expand(16, 2)
    dpo = dpo_loss_from_logits(dpo_logits(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], 7.0))
    for options in ({"weighting": "uniform"}, {"normalize": "weights"}):
        loss, _ = rankdpo_loss(policy, reference, phi, beta=7.0, **options)
        torch.testing.assert_close(loss, dpo)
    # The paper's DCG weight of that pair: |2^1 - 2^0| * |1/log2(2) - 1/log2(3)|.
    loss, parts = rankdpo_loss(policy, reference, phi, beta=7.0)
    weight = 1.0 * (1.0 - 1.0 / math.log2(3.0))
    torch.testing.assert_close(parts["weights"][:, 0, 1], torch.full((16,), weight))
    torch.testing.assert_close(loss, weight * dpo)
    # The loser listed first changes nothing (phi, not the position, says who won).
    swapped, _ = rankdpo_loss(policy.flip(1), reference.flip(1), phi.flip(1), beta=7.0, weighting="uniform")
    torch.testing.assert_close(swapped, dpo)


def test_hand_computed_k3_loss():
    # s = policy - reference = (0.1, -0.2, 0.0); phi = (1, 0.5, 0); beta = 2 → z_ij = -(s_i - s_j).
    policy, reference = torch.tensor([[0.3, 0.0, 0.5]]), torch.tensor([[0.2, 0.2, 0.5]])
    phi = torch.tensor([[1.0, 0.5, 0.0]])
    loss, parts = rankdpo_loss(policy, reference, phi, beta=2.0)
    # Predicted ranks by s ascending: image 1 (-0.2) first, image 2 (0.0), image 0 (0.1).
    assert parts["ranks"].tolist() == [[3, 1, 2]]
    inv = {r: 1 / math.log2(1 + r) for r in (1, 2, 3)}
    gain = [2 ** 1.0, 2 ** 0.5, 2 ** 0.0]
    s = [0.1, -0.2, 0.0]
    ranks = [3, 1, 2]
    expected = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):  # phi_i > phi_j
        weight = abs(gain[i] - gain[j]) * abs(inv[ranks[i]] - inv[ranks[j]])
        expected += weight * math.log1p(math.exp(s[i] - s[j]))  # -log sigmoid(-(s_i - s_j))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Ranks from the labels instead: phi descending → (1, 2, 3).
    _, by_label = rankdpo_loss(policy, reference, phi, beta=2.0, rank_source="labels")
    assert by_label["ranks"].tolist() == [[1, 2, 3]]
    normalized, _ = rankdpo_loss(policy, reference, phi, beta=2.0, normalize="weights")
    assert normalized.item() == pytest.approx(expected / parts["weights"].sum().item(), rel=1e-6)


def test_equal_phi_contributes_nothing():
    policy, reference = random_mses((4, 4), 1)
    policy.requires_grad_(True)
    phi = torch.tensor([[0.5, 0.5, 1.0, 0.0]]).expand(4, 4)
    loss, parts = rankdpo_loss(policy, reference, phi, beta=50.0)
    assert not parts["pairs"][:, 0, 1].any() and not parts["pairs"][:, 1, 0].any()
    assert (parts["weights"][:, 0, 1] == 0).all() and (parts["weights"][:, 1, 0] == 0).all()
    # Moving only the two tied images together (their pairs with the others fixed) cannot be seen:
    # a ranking whose phi are all equal has loss 0 and no gradient.
    flat, _ = rankdpo_loss(policy, reference, torch.full((4, 4), 0.25), beta=50.0)
    assert flat.abs().max().item() == 0.0
    (grad,) = torch.autograd.grad(flat.sum(), policy)
    assert grad.abs().max().item() == 0.0


def test_pair_weights_are_symmetric_with_zero_diagonal():
    g = torch.Generator().manual_seed(2)
    phi = torch.rand(5, 6, generator=g)
    ranks = rank_positions(torch.rand(5, 6, generator=g))
    weights = dcg_pair_weights(phi, ranks)
    torch.testing.assert_close(weights, weights.transpose(1, 2))
    assert weights.diagonal(dim1=1, dim2=2).abs().max().item() == 0.0
    assert sorted(ranks[0].tolist()) == [1, 2, 3, 4, 5, 6]


def test_ranks_are_stable_and_masked_slots_rank_last():
    keys = torch.tensor([[0.0, 0.0, -1.0, 5.0]])
    assert rank_positions(keys).tolist() == [[2, 3, 1, 4]]
    assert rank_positions(keys, torch.tensor([[True, True, False, True]])).tolist() == [[1, 2, 4, 3]]


def test_no_gradient_flows_through_the_ranks():
    policy, reference = random_mses((3, 4), 3)
    policy.requires_grad_(True)
    phi = torch.tensor([[1.0, 0.75, 0.25, 0.0]]).expand(3, 4)
    loss, parts = rankdpo_loss(policy, reference, phi, beta=20.0)
    assert not parts["weights"].requires_grad and not parts["ranks"].requires_grad
    (grad,) = torch.autograd.grad(loss.sum(), policy)
    # The same sum with the weights as constants: identical gradient, so the sort adds nothing.
    constant = parts["weights"].detach()
    z = dpo_logits(policy[:, :, None], policy[:, None, :], reference[:, :, None], reference[:, None, :], 20.0)
    expected = (constant * dpo_loss_from_logits(z)).sum()
    (want,) = torch.autograd.grad(expected, policy)
    torch.testing.assert_close(grad, want)


def test_masked_slots_are_ignored():
    policy, reference = random_mses((2, 4), 4)
    phi = torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.5, 0.25]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    loss, parts = rankdpo_loss(policy, reference, phi, beta=10.0, mask=mask)
    alone, _ = rankdpo_loss(policy[:1, :3], reference[:1, :3], phi[:1, :3], beta=10.0)
    torch.testing.assert_close(loss[:1], alone)
    assert not parts["pairs"][0, :, 3].any() and not parts["pairs"][0, 3, :].any()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="rank_source"):
        rankdpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 1.0, rank_source="predicted")
    with pytest.raises(ConfigError, match="weighting"):
        RankDPO(None, RankDPOOptions(weighting="ndcg"))
    with pytest.raises(ConfigError, match="beta"):
        RankDPO(None, RankDPOOptions(beta=0.0))


# ------------------------------------------------------------------ the objective on tiny models


def lora_generator(tiny_model_dir, family, perturb=0.0):
    generator = load_generator(tiny_model_dir(family))
    trainable = generator.add_lora(rank=2)
    if perturb:
        with torch.no_grad():
            for i, p in enumerate(trainable):
                p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return generator, trainable


def ranking_batch(generator, prompts=2, k=4, seed=0, phi=None):
    size = generator.default_resolution
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(prompts, k, 3, size, size, generator=g)
    if phi is None:
        phi = torch.linspace(1, 0, k).expand(prompts, k).clone()
    return {"prompts": PROMPTS[:prompts], "images": images, "scores": phi, "mask": torch.ones(prompts, k, dtype=torch.bool)}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_ln2_per_pair_when_policy_equals_reference(tiny_model_dir, family):
    generator, _ = lora_generator(tiny_model_dir, family)  # LoRA B = 0: policy = reference
    batch = ranking_batch(generator)
    loss, metrics = RankDPO(generator, RankDPOOptions(beta=5000.0)).loss(batch, rng())
    # s = 0 for every image: ranks are the stored order (stable sort), each pair costs Delta_ij ln 2.
    weights = dcg_pair_weights(batch["scores"], torch.arange(1, 5).expand(2, 4))
    pairs = batch["scores"][:, :, None] > batch["scores"][:, None, :]
    assert loss.item() == pytest.approx(math.log(2) * (weights * pairs).sum().item() / 2, rel=1e-6)
    assert metrics["pair_accuracy"] == 0.5 and metrics["pairs_per_prompt"] == 6
    normalized, _ = RankDPO(generator, RankDPOOptions(normalize="weights")).loss(batch, rng())
    assert normalized.item() == pytest.approx(math.log(2), abs=1e-6)


def cache(generator, batch):
    with torch.no_grad():
        flat = batch["images"].flatten(0, 1)
        batch["cached"] = {"images": generator.encode(flat, sample=False).view(*batch["images"].shape[:2], -1,
                                                                               *generator.latent_shape(1)[2:]).contiguous(),
                           "cond": generator.encode_prompt(batch["prompts"])}
    return batch


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_objective_with_k2_equals_the_dpo_objective(tiny_model_dir, family):
    generator, _ = lora_generator(tiny_model_dir, family, perturb=0.05)
    ranking = cache(generator, ranking_batch(generator, prompts=3, k=2, phi=torch.tensor([[1.0, 0.0]] * 3)))
    cached = ranking["cached"]
    pairs = {"prompts": ranking["prompts"], "winner": ranking["images"][:, 0], "loser": ranking["images"][:, 1],
             "label": torch.ones(3),
             "cached": {"winner": cached["images"][:, 0], "loser": cached["images"][:, 1], "cond": cached["cond"]}}
    dpo, dpo_metrics = DiffusionDPO(generator, DPOOptions(beta=2000.0)).loss(pairs, rng())
    ranked, metrics = RankDPO(generator, RankDPOOptions(beta=2000.0, weighting="uniform")).loss(ranking, rng())
    torch.testing.assert_close(ranked, dpo)
    assert metrics["margin"] == pytest.approx(dpo_metrics["margin"], rel=1e-5) and metrics["margin"] != 0


def test_sft_term_on_the_best_image_equals_dpo_with_its_sft_term_at_k2(tiny_model_dir):
    generator, _ = lora_generator(tiny_model_dir, "sd", perturb=0.05)
    # k = 2, the winner second: the term must follow phi, not the slot.
    ranking = cache(generator, ranking_batch(generator, prompts=3, k=2, phi=torch.tensor([[0.0, 1.0]] * 3)))
    cached = ranking["cached"]
    pairs = {"prompts": ranking["prompts"], "winner": ranking["images"][:, 1], "loser": ranking["images"][:, 0],
             "label": torch.ones(3),
             "cached": {"winner": cached["images"][:, 1], "loser": cached["images"][:, 0], "cond": cached["cond"]}}
    dpo, metrics = DiffusionDPO(generator, DPOOptions(beta=2000.0, sft_weight=3.0)).loss(pairs, rng())
    ranked, _ = RankDPO(generator, RankDPOOptions(beta=2000.0, weighting="uniform", sft_weight=3.0)).loss(ranking, rng())
    plain, _ = RankDPO(generator, RankDPOOptions(beta=2000.0, weighting="uniform")).loss(ranking, rng())
    torch.testing.assert_close(ranked, dpo)
    assert ranked.item() == pytest.approx(plain.item() + 3.0 * metrics["mse_winner"], rel=1e-5)
    # A padded slot is never the "best" image even when its score is the largest.
    padded = ranking_batch(generator, prompts=2, k=3, phi=torch.tensor([[0.2, 0.1, 9.0], [0.5, 0.3, 0.1]]))
    padded["mask"][0, 2] = False
    with_pad, _ = RankDPO(generator, RankDPOOptions(sft_weight=1.0)).loss(padded, rng())
    padded["scores"] = torch.tensor([[0.2, 0.1, -1.0], [0.5, 0.3, 0.1]])  # the pad's score no longer matters
    expected, _ = RankDPO(generator, RankDPOOptions(sft_weight=1.0)).loss(padded, rng())
    torch.testing.assert_close(with_pad, expected)


def test_k_images_share_noise_and_timestep_policy_runs_once_reference_in_chunks(tiny_model_dir):
    generator, _ = lora_generator(tiny_model_dir, "sd", perturb=0.05)
    seen = []
    original_add_noise = generator.add_noise

    def add_noise_hook(latents, noise, t):
        seen.append((noise.clone(), t.clone()))
        return original_add_noise(latents, noise, t)

    generator.add_noise = add_noise_hook
    sizes = []
    pre = generator.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append((args[0] if args else kwargs.get("sample")).shape[0]), with_kwargs=True)
    batch = ranking_batch(generator, prompts=2, k=4)
    batch["mask"][1, 3] = False  # a ragged ranking: 7 real images
    try:
        loss, metrics = RankDPO(generator, RankDPOOptions(beta=100.0, reference_chunk_size=3)).loss(batch, rng())
        whole, _ = RankDPO(generator, RankDPOOptions(beta=100.0)).loss(batch, rng())
    finally:
        pre.remove()
    noise, t = seen[0]
    for group in range(2):
        rows = range(4 * group, 4 * group + 4)
        assert all(torch.equal(noise[r], noise[4 * group]) and torch.equal(t[r], t[4 * group]) for r in rows)
    assert not torch.equal(noise[0], noise[4])
    assert sizes[:4] == [7, 3, 3, 1]  # policy once on the 7 real images; reference in chunks of 3
    assert sizes[4:] == [7, 7]
    # Convolution kernels may round differently at another batch size: equal up to float rounding.
    torch.testing.assert_close(loss, whole, rtol=1e-4, atol=1e-6)
    assert metrics["pairs_per_prompt"] == pytest.approx((6 + 3) / 2)


def test_reference_gets_no_gradient_and_policy_does(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    generator.enable_full_finetuning(snapshot_reference=True)
    with torch.no_grad():
        for p in generator.denoiser.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    loss, metrics = RankDPO(generator, RankDPOOptions(beta=100.0)).loss(ranking_batch(generator), rng())
    loss.backward()
    reference = generator._reference_module
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.denoiser.parameters())
    assert metrics["margin"] != 0.0


def write_synth_layout(folder, prompts=4, k=3, size=32):
    """A data set in the layout ``visalign dataset synth`` writes (PNGs + a parquet part)."""
    (folder / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for p in range(prompts):
        names = []
        for j in range(k):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            names.append(f"images/{p:07d}_g0_{j}.png")
            Image.fromarray(pixels).save(folder / names[-1])
        rows.append({"prompt_index": p, "prompt": PROMPTS[p % 3], "images": names,
                     "scores": [1.0, 0.5, 0.5][:k], "rewards": [[1.0]] * k})
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0000000-0000003.parquet")
    return folder


def test_trains_on_a_synth_data_set_with_and_without_the_latent_cache(tiny_model_dir, tmp_path):
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    data = write_synth_layout(tmp_path / "synth")
    for name, extra in (("plain", {}), ("cached", {"cache_dir": str(tmp_path / "cache"), "random_flip": False})):
        config = load_config(TrainConfig, data={
            "model": {"path": str(tiny_model_dir("sd")), "lora": {"rank": 2}},
            "objective": "rankdpo", "options": {"beta": 500.0, "reference_chunk_size": 2},
            "data": {"format": "parquet", "path": str(data), **extra},
            "batch_size": 2, "max_steps": 2, "checkpoint_every": 0, "output_dir": str(tmp_path / name), "cpu": True,
        })
        result = train(config)
        assert result.step == 2 and (result.final_weights / "pytorch_lora_weights.safetensors").is_file()


def test_docs_option_table_matches_the_options_dataclass():
    import dataclasses
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "algorithms" / "rankdpo.md").read_text()
    documented = dict(re.findall(r"^\| `(\w+)` \| `?([\w.]+)`? \|", page, flags=re.M))
    defaults = {f.name: f.default for f in dataclasses.fields(RankDPOOptions)}
    assert set(documented) == set(defaults)
    for name, value in defaults.items():
        assert documented[name] == (f"{value:g}" if isinstance(value, float) else str(value)), name
