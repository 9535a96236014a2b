"""SePPO (ALGORITHMS.md §4): the flipper, the DPO identity at mu = +1, the checkpoint pool, where
reference samples come from, the cache, and a trainer run on winners only."""

import json
import math
import random

import pytest
import torch
from PIL import Image

import visalign.algorithms.seppo as seppo
from visalign.algorithms.dpo import DiffusionDPO, DPOOptions, dpo_logits, dpo_loss_from_logits
from visalign.algorithms.seppo import (
    CheckpointPool, PoolEntry, SePPO, SePPOOptions, anchor_flipper, seppo_logits, snapshot_weights, weights_digest)
from visalign.config import ConfigError
from visalign.models import load_generator

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
FAST = dict(num_inference_steps=3, guidance_scale=2.0)


def caption_batch(generator, count=3, seed=0):
    size = generator.default_resolution
    g = torch.Generator().manual_seed(seed)
    return {"prompts": PROMPTS[:count], "images": torch.rand(count, 3, size, size, generator=g)}


def lora_generator(tiny_model_dir, family="sd", alpha=None):
    generator = load_generator(tiny_model_dir(family))
    return generator, generator.add_lora(rank=2, alpha=alpha)


def perturb(parameters, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn(p.shape, generator=g))


def rng():
    return torch.Generator().manual_seed(123)


# ------------------------------------------------------------------ the flipper and the loss


def test_flipper_values_variants_and_tie_policy():
    policy = torch.tensor([0.2, 0.5, 0.3])
    reference = torch.tensor([0.4, 0.1, 0.3])  # policy better, worse, tie
    assert anchor_flipper(policy, reference).tolist() == [1.0, -1.0, 1.0]
    assert anchor_flipper(policy, reference, tie=-1.0).tolist() == [1.0, -1.0, -1.0]
    assert anchor_flipper(policy, reference, tie=0.0).tolist() == [1.0, -1.0, 0.0]
    assert anchor_flipper(policy, reference, "indicator").tolist() == [1.0, 0.0, 1.0]
    assert anchor_flipper(policy, reference, "indicator", tie=0.0).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="flipper variant"):
        anchor_flipper(policy, reference, "soft")


def test_flipper_carries_no_gradient():
    g = torch.Generator().manual_seed(0)
    m_w, m_r, r_w, r_r = (torch.rand(8, generator=g).requires_grad_() for _ in range(4))
    mu = anchor_flipper(m_w, r_w)
    assert not mu.requires_grad
    z = seppo_logits(m_w, m_r, r_w, r_r, mu, beta=10.0)
    grads = torch.autograd.grad(z.sum(), (m_w, m_r, r_w, r_r))
    # d z / d m_w = -beta/2 and d z / d r_w = +beta/2 exactly: nothing flows through mu.
    torch.testing.assert_close(grads[0], torch.full((8,), -5.0))
    torch.testing.assert_close(grads[2], torch.full((8,), 5.0))
    torch.testing.assert_close(grads[1], 5.0 * mu)
    torch.testing.assert_close(grads[3], -5.0 * mu)


def test_logits_hand_computed_and_mu_plus_one_is_dpo():
    m_w, m_r, r_w, r_r = torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.4]), torch.tensor([0.45])
    # (m_w - r_w) = -0.1, (m_r - r_r) = 0.05; mu=+1: z = -(10/2)(-0.1 - 0.05) = 0.75; mu=-1: -(5)(-0.05) = 0.25
    torch.testing.assert_close(seppo_logits(m_w, m_r, r_w, r_r, torch.tensor([1.0]), 10.0), torch.tensor([0.75]))
    torch.testing.assert_close(seppo_logits(m_w, m_r, r_w, r_r, torch.tensor([-1.0]), 10.0), torch.tensor([0.25]))
    torch.testing.assert_close(seppo_logits(m_w, m_r, r_w, r_r, torch.tensor([0.0]), 10.0), torch.tensor([0.5]))
    g = torch.Generator().manual_seed(1)
    values = [torch.rand(16, generator=g) for _ in range(4)]
    torch.testing.assert_close(seppo_logits(*values, torch.ones(16), 7.0), dpo_logits(*values, 7.0))


def test_objective_with_mu_plus_one_equals_dpo_with_the_reference_sample_as_loser(tiny_model_dir, monkeypatch):
    generator, trainable = lora_generator(tiny_model_dir)
    objective = SePPO(generator, SePPOOptions(beta=200.0, **FAST))
    objective.start()
    perturb(trainable)  # the policy moves away from theta_0, the reference
    objective.select_reference(1)
    batch = caption_batch(generator)
    with torch.no_grad():
        anchors = generator.encode(batch["images"], sample=False)
        cond = generator.encode_prompt(batch["prompts"])
    samples = objective.reference_samples(batch["prompts"], 32, 32)
    monkeypatch.setattr(seppo, "anchor_flipper", lambda *args, **kwargs: torch.ones(len(PROMPTS)))
    ours, metrics = objective.loss(dict(batch, cached={"images": anchors, "cond": cond}), rng())
    pair = {"prompts": batch["prompts"], "winner": batch["images"], "loser": batch["images"],
            "cached": {"winner": anchors, "loser": samples, "cond": cond}}
    dpo, dpo_metrics = DiffusionDPO(generator, DPOOptions(beta=200.0)).loss(pair, rng())
    assert ours.item() == pytest.approx(dpo.item(), rel=1e-6)
    assert ours.item() != pytest.approx(math.log(2), abs=1e-4)
    ours_grad = torch.autograd.grad(ours, trainable, allow_unused=True)
    dpo_grad = torch.autograd.grad(dpo, trainable, allow_unused=True)
    for a, b in zip(ours_grad, dpo_grad):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["sd", "sd-v", "sd3"])
def test_at_initialisation_the_tie_gives_mu_plus_one_and_ln2(tiny_model_dir, family):
    generator, trainable = lora_generator(tiny_model_dir, family)
    objective = SePPO(generator, SePPOOptions(**FAST))
    objective.start()
    objective.select_reference(0)
    loss, metrics = objective.loss(caption_batch(generator), rng())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["mu_mean"] == 1.0 and metrics["reference_step"] == 0.0
    # mu = 0 (indicator, ties to 0): the anchor term alone still has a gradient.
    zero = SePPO(generator, SePPOOptions(flipper="indicator", tie=0.0, **FAST))
    zero.start()
    zero.select_reference(0)
    loss, metrics = zero.loss(caption_batch(generator), rng())
    assert metrics["mu_mean"] == 0.0 and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)



def test_sft_term_adds_the_weighted_winner_mse_to_loss_and_gradient(tiny_model_dir):
    """sft_weight w: loss = SePPO loss + w * mean anchor MSE (the same noise and timestep), so the
    gradient difference is w times the gradient of the anchors' denoising loss."""
    generator, trainable = lora_generator(tiny_model_dir)
    perturb(trainable)
    batch = caption_batch(generator)
    losses, grads = {}, {}
    for w in (0.0, 3.0):
        objective = SePPO(generator, SePPOOptions(beta=200.0, sft_weight=w, **FAST))
        objective.start()
        objective.select_reference(0)
        loss, metrics = objective.loss(batch, rng())
        losses[w], grads[w] = loss, torch.autograd.grad(loss, trainable, allow_unused=True)
        assert metrics["loss"] == pytest.approx(loss.item())
    winner_mse = metrics["mse_winner"]
    assert winner_mse > 0
    assert losses[3.0].item() == pytest.approx(losses[0.0].item() + 3.0 * winner_mse, rel=1e-5)
    assert any(a is not None and not torch.allclose(a, b) for a, b in zip(grads[3.0], grads[0.0]))
    with pytest.raises(ConfigError, match="sft_weight"):
        SePPO(generator, SePPOOptions(sft_weight=-1.0))

def test_options_are_checked():
    with pytest.raises(ConfigError, match="reference_strategy"):
        SePPO(None, SePPOOptions(reference_strategy="best"))
    with pytest.raises(ConfigError, match="tie"):
        SePPO(None, SePPOOptions(flipper="indicator", tie=-1.0))
    with pytest.raises(ConfigError, match="flipper"):
        SePPO(None, SePPOOptions(flipper="soft"))


# ------------------------------------------------------------------ the pool


def test_pool_keeps_theta0_and_is_bounded():
    pool = CheckpointPool(3)
    for step in (0, 2, 4, 6, 8):
        pool.add(step, {"w": torch.tensor([float(step)])})
    assert [e.step for e in pool.entries] == [0, 6, 8]
    assert [e.step for e in pool.eligible(8)] == [0, 6]
    assert pool.select("initial", 9, random.Random(0)).step == 0
    assert pool.select("latest", 8, random.Random(0)).step == 6
    assert {pool.select("random", 9, random.Random(s)).step for s in range(50)} == {0, 6, 8}
    assert [e.step for e in CheckpointPool(1).eligible(0)] == []


@pytest.mark.parametrize("strategy", ["random", "latest", "initial"])
def test_pool_sampler_never_returns_the_current_weights(tiny_model_dir, strategy):
    generator, trainable = lora_generator(tiny_model_dir)
    objective = SePPO(generator, SePPOOptions(reference_strategy=strategy, save_every=2, pool_size=3, **FAST))
    objective.start()
    chosen = []
    for step in range(9):
        entry = objective.select_reference(step)
        current = weights_digest(snapshot_weights(generator))
        if step > 0:
            assert entry.digest != current and entry.step < step
        chosen.append(entry.step)
        perturb(trainable, 0.01, seed=step)  # an optimisation step
    assert len(objective.pool.entries) == 3 and objective.pool.entries[0].step == 0
    if strategy == "initial":
        assert set(chosen) == {0}
    if strategy == "latest":
        assert chosen == [0, 0, 0, 2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("mode", ["lora-alpha", "full"])
def test_a_snapshot_used_as_reference_reproduces_those_weights(tiny_model_dir, mode):
    if mode == "full":
        generator = load_generator(tiny_model_dir("sd"))
        trainable = generator.enable_full_finetuning(snapshot_reference=False)
    else:
        generator, trainable = lora_generator(tiny_model_dir, alpha=8)  # scale alpha / rank = 4
    objective = SePPO(generator, SePPOOptions(**FAST))
    objective.start()
    perturb(trainable, 0.02)
    objective._use(PoolEntry(5, snapshot_weights(generator), weights_digest(snapshot_weights(generator))))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(generator.latent_shape(2), generator=g)
    t = generator.sample_timesteps(2, generator=g)
    cond = generator.encode_prompt(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(objective.reference().predict(x_t, t, cond), generator.predict(x_t, t, cond))
        perturb(trainable, 0.02, seed=1)
        assert not torch.allclose(objective.reference().predict(x_t, t, cond), generator.predict(x_t, t, cond))


# ------------------------------------------------------------------ reference samples


def _digest_hook(generator, objective, seen):
    """Record, for every denoiser call, the digest of the weights that call ran with."""
    def on_policy(module, args):
        if generator.has_adapters():
            active = module.active_adapters()[0]
            weights = generator.lora_state_dict(active)
            seen.append(("reference" if active == "reference" else "policy", weights_digest(weights)))
        else:
            seen.append(("policy", weights_digest(module.state_dict())))

    def on_reference(module, args):
        seen.append(("reference", weights_digest(module.state_dict())))

    handles = [generator.denoiser.register_forward_pre_hook(on_policy)]
    if objective._reference_module is not None:
        handles.append(objective._reference_module.register_forward_pre_hook(on_reference))
    return handles


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reference_samples_come_from_the_reference_checkpoint(tiny_model_dir, mode):
    if mode == "full":
        generator = load_generator(tiny_model_dir("sd"))
        trainable = generator.enable_full_finetuning(snapshot_reference=False)
    else:
        generator, trainable = lora_generator(tiny_model_dir)
    objective = SePPO(generator, SePPOOptions(save_every=1, reference_strategy="latest", **FAST))
    objective.start()
    for step in range(3):
        objective.select_reference(step)
        perturb(trainable, 0.02, seed=step)
    entry = objective.select_reference(3)
    assert entry.step == 2
    policy_digest = weights_digest(snapshot_weights(generator))
    seen = []
    handles = _digest_hook(generator, objective, seen)
    try:
        objective.reference_samples(PROMPTS, 32, 32)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == FAST["num_inference_steps"]  # one (CFG-batched) call per step, all by the reference
    assert {kind for kind, _ in seen} == {"reference"}
    assert {digest for _, digest in seen} == {entry.digest} and entry.digest != policy_digest


def test_cache_returns_what_generation_would_and_skips_the_sampler(tiny_model_dir):
    generator, trainable = lora_generator(tiny_model_dir)
    cached = SePPO(generator, SePPOOptions(**FAST))
    cached.start()
    cached.select_reference(0)
    first = cached.reference_samples(PROMPTS, 32, 32)
    calls = []
    handle = generator.denoiser.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        again = cached.reference_samples(list(reversed(PROMPTS)) + PROMPTS[:1], 32, 32)
    finally:
        handle.remove()
    assert calls == [] and cached.stats["cache_hits"] == 4
    torch.testing.assert_close(again, torch.stack([first[2], first[1], first[0], first[0]]))
    uncached = SePPO(generator, SePPOOptions(cache_size=0, **FAST))
    uncached.start()
    uncached.select_reference(0)
    torch.testing.assert_close(uncached.reference_samples(PROMPTS[1:2], 32, 32)[0], first[1])
    # Another checkpoint gives other samples (and other cache entries) for the same prompt.
    latest = SePPO(generator, SePPOOptions(reference_strategy="latest", save_every=1, **FAST))
    latest.start()
    latest.select_reference(0)
    perturb(trainable, 0.2)
    latest.select_reference(1)  # snapshots the perturbed weights
    assert latest.select_reference(2).step == 1
    assert not torch.allclose(latest.reference_samples(PROMPTS[:1], 32, 32)[0], first[0])


# ------------------------------------------------------------------ the trainer, winners only


def _winners(folder, count=8):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = ("red", "green", "blue")[i % 3]
        Image.new("RGB", (32, 32), {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[colour]).save(
            folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {colour} square"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "captions.jsonl")


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_trainer_runs_seppo_on_winners_and_resumes_exactly(tiny_model_dir, tmp_path, finetune):
    from safetensors.torch import load_file

    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    data = _winners(tmp_path / "data")

    def config(out, *extra):
        return load_config(TrainConfig, overrides=[
            f"model.path={tiny_model_dir('sd')}", f"model.finetune={finetune}", f"data.path={data}",
            f"output_dir={out}", "objective=seppo", "batch_size=2", "log_every=1", "optim.lr=1e-3",
            "max_steps=4", "data.random_flip=false",
            "options={beta: 500, save_every: 1, pool_size: 3, num_inference_steps: 2, guidance_scale: 2.0}", *extra])

    straight = train(config(tmp_path / "straight", "checkpoint_every=0"))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pool_size"] for r in rows] == [1.0, 2.0, 3.0, 3.0]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[-1]["reference_step"] < 3
    assert all(math.isfinite(r["loss"]) for r in rows)
    if finetune == "full":
        return
    train(config(tmp_path / "resumed", "checkpoint_every=2", "max_steps=2"))
    resumed = train(config(tmp_path / "resumed", "checkpoint_every=2", "resume=latest"))
    a = load_file(str(straight.final_weights / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.final_weights / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_weights_digest_reads_scalar_tensors_and_sees_their_values():
    """0-dim tensors (e.g. a CLIP reward's logit scale) are digested, not refused, and count."""
    weights = {"w": torch.ones(2, 3), "scale": torch.tensor(4.0)}
    assert weights_digest(weights) == weights_digest({k: v.clone() for k, v in weights.items()})
    assert weights_digest(weights) != weights_digest({**weights, "scale": torch.tensor(4.5)})
