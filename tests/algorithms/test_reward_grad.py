"""DRaFT, AlignProp and ReFL (ALGORITHMS.md §6): which denoiser calls carry parameter gradient,
no graph in DRaFT-LV's base sample, a frozen reward, checkpointing that changes nothing, the
refusal of non-differentiable rewards, hand values of the loss shapes, and trainer runs."""

import json
from pathlib import Path

import pytest
import torch

import rewards
from rewards.tiny import tiny_clip_reward
from visalign.algorithms.reward_grad import (
    AlignProp,
    AlignPropOptions,
    DRaFT,
    DRaFTOptions,
    ReFL,
    ReFLOptions,
    draw_cuts,
    reward_loss,
)
from visalign.config import ConfigError, load_config
from visalign.models import load_generator

CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "configs"
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def reward():
    return tiny_clip_reward(seed=0, score_scale=10.0)


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    """One LoRA generator per family, shared by the tests (reset by :func:`fresh`). The LoRA
    up-projections are perturbed so every adapter weight gets a non-zero gradient."""
    built = {}

    def get(family):
        if family not in built:
            gen = load_generator(tiny_model_dir(family))
            with torch.no_grad():
                for i, p in enumerate(gen.add_lora(rank=2)):
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            built[family] = gen
        return fresh(built[family])

    return get


def fresh(gen):
    gen.set_forward_module(None)
    gen.denoiser.disable_gradient_checkpointing()
    gen.vae.disable_gradient_checkpointing()
    for p in gen.trainable_parameters():
        p.grad = None
    return gen


def objective(cls, gen, reward, batch_size=2, **options):
    obj = cls(gen, cls.Options(**options), reward=reward)
    obj.prompts = PROMPTS
    obj.bind(batch_size)
    return obj


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


def trace_calls(gen):
    """Record every denoiser call and which of them receive a gradient in backward.

    Returns ``(calls, grads)``: ``calls`` counts forward calls; ``grads[i]`` is the gradient that
    reached call ``i``'s output (only calls on the backward path appear)."""
    calls, grads = [0], {}

    def on_forward(module, args, kwargs, output):
        index = calls[0]
        calls[0] += 1
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda g, i=index: grads.__setitem__(i, g.detach().clone()))

    handle = gen.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    return calls, grads, handle


def run_traced(obj, seed=0):
    calls, grads, handle = trace_calls(obj.generator)
    try:
        loss, metrics = obj.loss(None, rng(seed))
        loss.backward()
    finally:
        handle.remove()
    return calls[0], grads, metrics


def parameter_grads(gen):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in gen.trainable_parameters()]


# ------------------------------------------------------------------ pure pieces


def test_loss_shapes_match_hand_values():
    scores = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(reward_loss(scores, "negative"), torch.tensor(-2.0))
    torch.testing.assert_close(reward_loss(scores, "negative", scale=0.01), torch.tensor(-0.02))
    torch.testing.assert_close(reward_loss(scores, "l1_target", target=10.0), torch.tensor(8.0))  # (9 + 7) / 2
    torch.testing.assert_close(reward_loss(scores, "relu", target=2.0, scale=1e-3), torch.tensor(0.5e-3))  # (1 + 0) / 2
    with pytest.raises(ValueError, match="loss shape"):
        reward_loss(scores, "hinge")


def test_truncation_strategies_draw_one_valid_cut_per_trajectory():
    assert draw_cuts("fixed", 50, 3).tolist() == [49, 49, 49]
    uniform = draw_cuts("uniform", 50, 4000, rng())
    assert uniform.min() == 0 and uniform.max() == 49
    gaussian = draw_cuts("gaussian", 50, 4000, rng())
    assert gaussian.min() >= 1 and gaussian.max() <= 49
    # E[X | X < 50] for X ~ N(42, 5) is 42 - 5 phi(1.6) / Phi(1.6) = 41.41; int() floors, about -0.5 more.
    assert abs(gaussian.float().mean().item() - 40.91) < 0.25
    with pytest.raises(ValueError, match="not a step"):
        draw_cuts("fixed", 20, 1)  # 49 of 20 steps
    with pytest.raises(ValueError, match="gaussian truncation mean"):
        draw_cuts("gaussian", 20, 1)


# ------------------------------------------------------------------ which calls carry gradient


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_draft_k_gradient_comes_from_exactly_the_last_k_calls(generators, reward, family):
    obj = objective(DRaFT, generators(family), reward, variant="k", k=2, num_inference_steps=5,
                    gradient_checkpointing="none")
    calls, grads, _ = run_traced(obj)
    assert calls == 5 and sorted(grads) == [3, 4]
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(g.abs().sum() > 0 for g in parameter_grads(obj.generator))


def test_draft_full_backpropagates_through_every_call(generators, reward):
    obj = objective(DRaFT, generators("sd"), reward, variant="full", num_inference_steps=4, gradient_checkpointing="none")
    calls, grads, _ = run_traced(obj)
    assert calls == 4 and sorted(grads) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_draft_lv_base_sample_has_no_graph_and_one_call_per_copy_batch_carries_gradient(
        generators, reward, family, monkeypatch):
    gen = generators(family)
    obj = objective(DRaFT, gen, reward, variant="lv", lv_copies=3, num_inference_steps=4, gradient_checkpointing="none")
    seen = {}
    original = gen.add_noise

    def add_noise(x0, noise, t):
        seen.update(x0=x0, t=t, noise=noise)
        return original(x0, noise, t)

    monkeypatch.setattr(gen, "add_noise", add_noise)
    calls, grads, _ = run_traced(obj)
    assert seen["x0"].grad_fn is None and not seen["x0"].requires_grad
    assert seen["x0"].shape[0] == 2 * 3  # batch x copies
    copies = seen["x0"].reshape(2, 3, *seen["x0"].shape[1:])
    assert torch.equal(copies[:, 0], copies[:, 1])  # n copies of one base sample ...
    assert not torch.equal(seen["noise"][0], seen["noise"][1])  # ... re-noised independently
    assert seen["t"] == gen.sampling_timesteps(4)[0][-1]  # at the last sampler timestep
    assert calls == 4 + 1 and sorted(grads) == [4]  # the no-grad chain, then one batched step


def test_alignprop_fixed_cut_gives_gradient_from_the_last_step_only(generators, reward):
    obj = objective(AlignProp, generators("sd"), reward, num_inference_steps=5, truncation="fixed", truncation_fixed=4,
                    gradient_checkpointing="none")
    calls, grads, metrics = run_traced(obj)
    assert calls == 5 and sorted(grads) == [4] and metrics["grad_steps"] == 1


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_alignprop_gradient_comes_from_exactly_the_steps_after_its_single_cut(generators, reward, family):
    obj = objective(AlignProp, generators(family), reward, batch_size=1, num_inference_steps=6, truncation="uniform",
                    gradient_checkpointing="none")
    for seed in range(3):
        fresh(obj.generator)
        calls, grads, metrics = run_traced(obj, seed)
        cut = 6 - int(metrics["grad_steps"])
        assert calls == 6 and sorted(grads) == list(range(cut, 6))


def test_alignprop_cut_is_contiguous_and_drawn_per_trajectory(generators, reward):
    gen = generators("sd")
    obj = objective(AlignProp, gen, reward, batch_size=3, num_inference_steps=8, truncation="uniform", guidance_scale=3.0,
                    gradient_checkpointing="none")
    drawn = []
    original = obj.draw_cuts
    obj.draw_cuts = lambda generator: drawn.append(original(generator)) or drawn[-1]
    calls, grads, _ = run_traced(obj, seed=5)
    cuts = drawn[0].tolist()
    assert len(set(cuts)) > 1, "seed 5 should give different cuts"
    assert sorted(grads) == list(range(min(cuts), 8))
    for index, grad in grads.items():
        rows = grad.flatten(1).abs().sum(1)  # CFG batch: [uncond rows; cond rows]
        for b, cut in enumerate(cuts):
            carries = bool(rows[b] > 0) and bool(rows[3 + b] > 0)
            assert carries == (index >= cut), (index, b, cut)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_refl_gradient_comes_from_exactly_one_call_and_scores_the_closed_form_x0(generators, family):
    gen = generators(family)
    scored = {}

    def capture(images, prompts):
        scored["images"] = images
        return images.mean(dim=(1, 2, 3))

    obj = objective(ReFL, gen, rewards.FunctionReward(capture, differentiable=True), num_inference_steps=8,
                    min_step=4, max_step=6, gradient_checkpointing="none")
    inputs = {}
    handle = gen.denoiser.register_forward_hook(
        lambda m, args, kwargs, out: inputs.update(x=(args[0] if args else kwargs["hidden_states"]), out=out[0]),
        with_kwargs=True)
    calls, grads, metrics = run_traced(obj)
    handle.remove()
    step = int(metrics["refl_step"])
    assert 4 <= step <= 6
    assert calls == step + 1 and sorted(grads) == [step]  # the chain stops at step m
    t = gen.sampling_timesteps(8)[0][step]
    x_t, out = inputs["x"].detach(), inputs["out"].detach()
    if gen.is_flow:
        x0 = x_t - t * out  # x0 = x_s - s v
    else:
        abar = gen.alphas_cumprod[int(t)]
        x0 = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()  # (x_t - s_t eps) / a_t
    with torch.no_grad():
        torch.testing.assert_close(scored["images"].detach(), gen.decode(x0), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ the reward


def test_reward_parameters_get_no_gradient_but_the_pixels_do(generators, reward):
    gen = generators("sd")
    obj = objective(DRaFT, gen, reward, variant="k", k=1, num_inference_steps=3, gradient_checkpointing="none")
    loss, _ = obj.loss(None, rng())
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    assert all(g.abs().sum() > 0 for g in parameter_grads(gen))


def test_non_differentiable_reward_is_refused_with_a_clear_error(generators):
    oracle = rewards.FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), name="counter", differentiable=False)
    for cls in (DRaFT, AlignProp, ReFL):
        with pytest.raises(ConfigError, match="'counter' is not differentiable"):
            cls(None, reward=oracle)
    obj = DRaFT(generators("sd"), DRaFTOptions(reward="testbed-oracle"))
    with pytest.raises(ConfigError, match="'testbed-oracle' is not differentiable"):
        obj.bind(1)


def test_weighted_combination_of_rewards(generators, reward, monkeypatch):
    rewards.register("test-tiny-clip", lambda: tiny_clip_reward(seed=0, score_scale=10.0), overwrite=True)
    rewards.register("test-brightness", lambda: rewards.FunctionReward(
        lambda images, prompts: images.mean((1, 2, 3)), differentiable=True), overwrite=True)
    obj = DRaFT(generators("sd"), DRaFTOptions(reward_weights={"test-tiny-clip": 1.0, "test-brightness": 2.0},
                                               variant="k", num_inference_steps=3, gradient_checkpointing="none"))
    obj.prompts = PROMPTS
    obj.bind(2)
    assert isinstance(obj.reward, rewards.WeightedSum) and obj.reward.weights["test-brightness"] == 2.0
    loss, _ = obj.loss(None, rng())
    loss.backward()
    assert all(g.abs().sum() > 0 for g in parameter_grads(obj.generator))


# ------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("cls,options", [
    (DRaFT, dict(variant="full", num_inference_steps=4)),
    (AlignProp, dict(num_inference_steps=5, truncation="uniform")),
    (ReFL, dict(num_inference_steps=6, min_step=3, max_step=5)),
], ids=["draft-full", "alignprop", "refl"])
def test_gradient_checkpointing_gives_the_same_gradients(generators, reward, cls, options):
    results = {}
    for mode in ("none", "steps", "blocks"):
        gen = generators("sd")
        obj = objective(cls, gen, reward, gradient_checkpointing=mode, **options)
        loss, _ = obj.loss(None, rng(3))
        loss.backward()
        results[mode] = (loss.detach(), parameter_grads(gen))
    for mode in ("steps", "blocks"):
        torch.testing.assert_close(results[mode][0], results["none"][0])
        for got, expected in zip(results[mode][1], results["none"][1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ the trainer


def _fixed_reward(gen, reward, prompts, seed=11):
    with torch.no_grad():
        images = gen.sample(prompts, num_inference_steps=4, guidance_scale=3.0, generator=rng(seed)).images
        return reward(images, prompts).mean().item()


@pytest.mark.parametrize("name,options", [
    ("draft", {"variant": "lv", "lv_copies": 2}),
    ("alignprop", {"truncation": "uniform", "loss_scale": 1.0}),
])
def test_trainer_runs_the_objective_and_raises_the_reward(tiny_model_dir, tmp_path, name, options):
    from visalign.training import TrainConfig, train

    rewards.register("test-tiny-clip", lambda: tiny_clip_reward(seed=0, score_scale=10.0), overwrite=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    gen = load_generator(tiny_model_dir("sd"))
    judge = tiny_clip_reward(seed=0, score_scale=10.0)
    before = _fixed_reward(gen, judge, PROMPTS[:2])
    config = load_config(TrainConfig, data={
        "model": {"path": str(tiny_model_dir("sd")), "lora": {"rank": 4}}, "objective": name,
        "options": {"reward": "test-tiny-clip", "prompts": str(prompts), "num_inference_steps": 4,
                    "guidance_scale": 3.0, "eta": 0.0, **options},
        "optim": {"lr": 3e-2, "weight_decay": 0.0}, "batch_size": 2, "max_steps": 6, "log_every": 1,
        "checkpoint_every": 0, "output_dir": str(tmp_path / "run"), "seed": 0,
    })
    result = train(config, generator=gen)
    assert result.step == 6 and (result.final_weights / "pytorch_lora_weights.safetensors").is_file()
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and all("reward" in row and "grad_norm" in row for row in logged)
    assert _fixed_reward(gen, judge, PROMPTS[:2]) > before + 0.05


def test_refl_pretraining_regulariser_trains_on_captioned_images(tiny_model_dir, tmp_path):
    from PIL import Image

    from visalign.training import TrainConfig, train

    rewards.register("test-tiny-clip", lambda: tiny_clip_reward(seed=0, score_scale=10.0), overwrite=True)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "captions.jsonl", "w") as handle:
        for i, colour in enumerate(["red", "green", "blue", "red"]):
            Image.new("RGB", (32, 32), {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230)}[colour]
                      ).save(data / f"{i}.png")
            handle.write(json.dumps({"image": f"{i}.png", "caption": f"a {colour} square"}) + "\n")
    refl = {"reward": "test-tiny-clip", "num_inference_steps": 6, "min_step": 3, "max_step": 5, "pretrain_weight": 1.0}
    assert ReFL(None, ReFLOptions(**refl)).data_kinds == ("caption",)
    assert ReFL(None, ReFLOptions(**{**refl, "pretrain_weight": 0.0})).data_kinds == ()
    config = load_config(TrainConfig, data={
        "model": {"path": str(tiny_model_dir("sd"))}, "objective": "refl", "options": refl,
        "data": {"format": "captions", "path": str(data / "captions.jsonl")},
        "batch_size": 2, "max_steps": 2, "log_every": 1, "checkpoint_every": 0, "output_dir": str(tmp_path / "run"),
    })
    train(config)
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["pretrain_loss"] > 0 and abs(row["loss"] - row["pretrain_loss"]) < 0.02 for row in logged)


# ------------------------------------------------------------------ recipes

PUBLISHED = {  # ALGORITHMS.md §6: file -> (objective, options that must hold, lr, weight decay, lora rank)
    "sd15_draft.yaml": ("draft", {"variant": "lv", "lv_copies": 2, "num_inference_steps": 50, "guidance_scale": 7.5,
                                  "eta": 0.0}, 4e-4, 0.1, 8),
    "sd15_draft_k1.yaml": ("draft", {"variant": "k", "k": 1, "num_inference_steps": 50, "guidance_scale": 7.5}, 4e-4, 0.1, 8),
    "sdxl_draft.yaml": ("draft", {"variant": "lv", "lv_copies": 2, "num_inference_steps": 50}, 2e-4, 0.1, 32),
    "sd15_alignprop.yaml": ("alignprop", {"truncation": "gaussian", "truncation_mean": 42.0, "truncation_std": 5.0,
                                          "guidance_scale": 5.0, "eta": 1.0, "loss_scale": 0.01}, 1e-3, 1e-4, None),
    "sd15_refl.yaml": ("refl", {"num_inference_steps": 40, "min_step": 30, "max_step": 39, "loss": "relu",
                                "target": 2.0, "loss_scale": 1e-3}, 1e-5, 1e-2, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipes_carry_the_published_defaults(name):
    from visalign.training import TrainConfig, build_objective

    config = load_config(TrainConfig, CONFIGS / name)
    objective_name, expected, lr, weight_decay, rank = PUBLISHED[name]
    assert config.objective == objective_name
    built = build_objective(config.objective, None, config.options)
    for key, value in expected.items():
        assert getattr(built.options, key) == value, key
    assert (config.optim.lr, config.optim.weight_decay) == (lr, weight_decay)
    assert config.optim.max_grad_norm == 1.0
    if rank is not None:
        assert config.model.finetune == "lora" and config.model.lora.rank == rank
    assert build_objective(config.objective, None, config.options).options.gradient_checkpointing == "steps"
