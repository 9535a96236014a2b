"""Online reward fine-tuning (ALGORITHMS.md §5, §7, §12): PRDP, DDPO and Flow-GRPO.

Hand-computed losses and advantages, gradients checked through autograd, the log-prob
round trip (ratio 1 under unchanged weights) on tiny SD and SD3 models, and the trainer end to
end with an exact resume.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import rewards
from visalign.algorithms.ddpo import DDPO, DDPOOptions
from visalign.algorithms.grpo import GRPO, GRPOOptions
from visalign.algorithms.online import (
    PerPromptStatTracker,
    RewardMix,
    collect_rollout,
    gaussian_step_kl,
    group_advantages,
    group_pareto_mask,
    ppo_clip_loss,
    transition_log_probs,
)
from visalign.algorithms.prdp import PRDP, PRDPOptions, group_pairs, rdp_loss
from visalign.config import ConfigError, load_config
from visalign.models import load_generator
from visalign.training import TrainConfig, Trainer, train

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
ETA = {"sd": 1.0, "sd3": 0.7}


def brightness(images, prompts):
    return images.float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module", autouse=True)
def registered_rewards():
    rewards.register("test-brightness", lambda: rewards.FunctionReward(brightness, name="test-brightness"),
                     overwrite=True)
    rewards.register("test-constant", lambda: rewards.FunctionReward(lambda images, prompts: torch.ones(len(images)),
                                                                     name="test-constant"), overwrite=True)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def lora_generator(tiny_model_dir, family):
    generator = load_generator(tiny_model_dir(family))
    generator.add_lora(rank=2)
    return generator


# ------------------------------------------------------------------ advantages


def test_advantages_of_identical_rewards_are_zero():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=2)
    prompts = ["a"] * 4 + ["b"] * 4
    for _ in range(3):  # the batch branch first, then the per-prompt history
        advantages = tracker.update(prompts, torch.full((8,), 0.7))
        assert torch.equal(advantages, torch.zeros(8))
    assert torch.equal(group_advantages(torch.full((6,), 3.0), 3), torch.zeros(6))
    assert torch.equal(group_advantages(torch.full((6,), 3.0), 3, global_std=True), torch.zeros(6))


def test_stat_tracker_uses_the_batch_until_a_prompt_has_min_count_rewards():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b", "b"]
    first = tracker.update(prompts, torch.tensor([1.0, 3.0, 5.0, 7.0]))
    # batch mean 4, population std sqrt(5)
    torch.testing.assert_close(first, (torch.tensor([1.0, 3.0, 5.0, 7.0]) - 4) / (5**0.5 + 1e-6))
    second = tracker.update(prompts, torch.tensor([2.0, 2.0, 6.0, 6.0]))
    # "a" history [1, 3, 2, 2]: mean 2, std sqrt(0.5); "b" history [5, 7, 6, 6]: mean 6, std sqrt(0.5)
    torch.testing.assert_close(second, torch.zeros(4), atol=1e-6, rtol=0)
    third = tracker.update(prompts, torch.tensor([4.0, 0.0, 6.0, 6.0]))
    # buffer 4: "a" history [2, 2, 4, 0]: mean 2, std sqrt(2)
    expected_a = (torch.tensor([4.0, 0.0]) - 2) / (2**0.5 + 1e-6)
    torch.testing.assert_close(third[:2], expected_a)
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    torch.testing.assert_close(restored.update(prompts, torch.tensor([1.0, 2.0, 3.0, 4.0])),
                               tracker.update(prompts, torch.tensor([1.0, 2.0, 3.0, 4.0])))


def test_group_advantages_match_hand_values():
    rewards_ = torch.tensor([1.0, 3.0, 10.0, 10.0])
    # groups [1, 3] (mean 2, std 1) and [10, 10] (std 0)
    torch.testing.assert_close(group_advantages(rewards_, 2), torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0]))
    global_std = rewards_.std(unbiased=False)
    torch.testing.assert_close(group_advantages(rewards_, 2, global_std=True),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (global_std + 1e-4))


# ------------------------------------------------------------------ PPO clip and KL


def test_ppo_clip_loss_hand_values_and_the_clipped_branch_has_no_gradient():
    c = 0.1
    log_prob = torch.log(torch.tensor([1.0, 1.05, 1.3, 0.8, 0.8])).requires_grad_(True)
    advantages = torch.tensor([2.0, 1.0, 1.0, -1.0, 1.0])
    loss, ratio = ppo_clip_loss(log_prob, torch.zeros(5), advantages, clip_range=c, adv_clip=5.0)
    # ratio 1 → -A; inside the range → -A r; A>0 above 1+c → clipped -A(1+c); A<0 below 1-c → clipped A(1-c);
    # A>0 below 1-c → the unclipped -A r (the pessimistic maximum).
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.0, -1.05, -1.1, 0.9, -0.8]))
    loss.sum().backward()
    grad = log_prob.grad
    assert grad[2] == 0 and grad[3] == 0  # clipped: no gradient
    torch.testing.assert_close(grad[[0, 1, 4]], torch.tensor([-2.0, -1.05, -0.8]))
    # advantages are clamped to [-adv_clip, adv_clip]
    loss, _ = ppo_clip_loss(torch.zeros(1), torch.zeros(1), torch.tensor([9.0]), adv_clip=5.0)
    assert loss.item() == -5.0


def test_gaussian_step_kl_is_zero_for_equal_means_and_matches_the_formula():
    mean = torch.randn(2, 4, 3, 3)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    assert torch.equal(gaussian_step_kl(mean, mean, std), torch.zeros(2))
    torch.testing.assert_close(gaussian_step_kl(mean + 1.0, mean, std), torch.tensor([2.0, 0.125]))


# ------------------------------------------------------------------ the RDP loss


def test_rdp_loss_is_zero_with_zero_gradient_for_equal_rewards_at_theta_old():
    l_a = torch.zeros(3, 1, requires_grad=True)
    l_b = torch.zeros(3, 1, requires_grad=True)
    loss, pred, target = rdp_loss(l_a, l_b, torch.ones(3), torch.ones(3), beta=10.0, num_steps=20)
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(target, torch.zeros(3))
    loss.sum().backward()
    assert torch.equal(l_a.grad, torch.zeros(3, 1)) and torch.equal(l_b.grad, torch.zeros(3, 1))


def test_rdp_loss_hand_value_swap_symmetry_and_beta_scaling():
    l_a, l_b = torch.tensor([[2e-5, -1e-5]]), torch.tensor([[-1e-5, 3e-5]])
    r_a, r_b = torch.tensor([0.9]), torch.tensor([0.4])
    loss, pred, target = rdp_loss(l_a, l_b, r_a, r_b, beta=10.0, num_steps=20, clip_range=1e-4)
    # summed form over n = 2 of T = 20 steps: scale 10; pred = 10 (3e-5 - 4e-5) = -1e-4; target 0.05
    torch.testing.assert_close(pred, torch.tensor([-1e-4]))
    torch.testing.assert_close(target, torch.tensor([0.05]))
    torch.testing.assert_close(loss, torch.tensor([(0.05 + 1e-4) ** 2]))
    swapped, _, swapped_target = rdp_loss(l_b, l_a, r_b, r_a, beta=10.0, num_steps=20)
    torch.testing.assert_close(swapped, loss)
    torch.testing.assert_close(swapped_target, -target)
    _, _, doubled = rdp_loss(l_a, l_b, r_a, r_b, beta=20.0, num_steps=20)
    torch.testing.assert_close(doubled, target / 2)


def test_clipped_branch_kills_the_gradient_where_it_should():
    clip = 1e-4
    # Both log-ratios beyond the clip range towards the target: the clipped prediction is stuck at
    # T (2 clip) < target, so the clipped error is the maximum and no gradient flows.
    l_a = torch.tensor([[3e-4]], requires_grad=True)
    l_b = torch.tensor([[-3e-4]], requires_grad=True)
    loss, pred, _ = rdp_loss(l_a, l_b, torch.tensor([1.0]), torch.tensor([0.0]), beta=10.0, num_steps=20,
                             clip_range=clip)
    assert loss.item() == pytest.approx((20 * 2 * clip - 0.1) ** 2)
    loss.sum().backward()
    assert l_a.grad.item() == 0 and l_b.grad.item() == 0
    # Beyond the range *past* the target (overshoot): the unclipped error is larger, gradient flows
    # back towards the target.
    # pred 0.2 vs target 0.1: unclipped error 0.01 > clipped (0.002 - 0.1)^2.
    l_a = torch.tensor([[1e-2]], requires_grad=True)
    l_b = torch.tensor([[0.0]], requires_grad=True)
    loss, pred, target = rdp_loss(l_a, l_b, torch.tensor([1.0]), torch.tensor([0.0]), beta=10.0, num_steps=20,
                                  clip_range=clip)
    assert loss.item() == pytest.approx(0.01)
    loss.sum().backward()
    assert l_a.grad.item() == pytest.approx(2 * (0.2 - 0.1) * 20)
    assert l_b.grad.item() == pytest.approx(-2 * (0.2 - 0.1) * 20)
    # Inside the range both branches agree: the plain regression gradient.
    l_a = torch.tensor([[5e-5]], requires_grad=True)
    loss, _, _ = rdp_loss(l_a, torch.zeros(1, 1), torch.tensor([1.0]), torch.tensor([0.0]), beta=10.0,
                          num_steps=20, clip_range=clip)
    loss.sum().backward()
    assert l_a.grad.item() == pytest.approx(2 * (20 * 5e-5 - 0.1) * 20)


def test_group_pairs_and_pareto_selection():
    pairs = group_pairs(3, 2)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]
    keep = torch.tensor([True, False, False, False, False, True])
    assert group_pairs(3, 2, keep).tolist() == [[0, 1], [0, 2], [3, 5], [4, 5]]
    components = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.5, 2.0],  # group 1: sample 1 dominated by 0
                               [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # group 2: equal vectors, all kept
    assert group_pareto_mask(components, 3).tolist() == [True, False, True, True, True, True]


def test_reward_mix_weights_the_components():
    mix = RewardMix({"b": rewards.FunctionReward(brightness), "c": rewards.FunctionReward(lambda i, p: torch.ones(len(i)))},
                    {"b": 2.0, "c": 0.5})
    images = torch.full((2, 3, 4, 4), 0.25)
    total, components = mix(images, ["x", "y"])
    torch.testing.assert_close(components, torch.tensor([[0.25, 1.0], [0.25, 1.0]]))
    torch.testing.assert_close(total, torch.tensor([1.0, 1.0]))


def test_options_are_validated():
    with pytest.raises(ConfigError, match="group_size"):
        PRDP(None, PRDPOptions(group_size=1))
    with pytest.raises(ConfigError, match="form"):
        PRDP(None, PRDPOptions(form="sum"))
    with pytest.raises(ConfigError, match="eta"):
        DDPO(None, DDPOOptions(eta=0.0))
    assert not PRDP(None, PRDPOptions()).needs_reference and PRDP(None, PRDPOptions(kl_weight=0.1)).needs_reference
    assert GRPO(None, GRPOOptions()).needs_reference and not DDPO(None, DDPOOptions()).needs_reference


# ------------------------------------------------------------------ on the tiny models


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_re_evaluated_log_probs_equal_the_sampling_log_probs(tiny_model_dir, family):
    generator = lora_generator(tiny_model_dir, family)
    with torch.no_grad():  # a non-zero LoRA, so the policy differs from the reference
        for p in generator.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    rollout, images = collect_rollout(generator, PROMPTS[:2], 2, num_inference_steps=4, guidance_scale=3.0,
                                      eta=ETA[family], seed=7)
    assert rollout.latents.shape[:2] == (4, 5) and rollout.log_probs.shape == (4, 4) and images.shape[0] == 4
    assert torch.isfinite(rollout.log_probs).all()
    # every transition, mixed timesteps in one batched call
    samples = torch.arange(4).repeat_interleave(4)
    steps = torch.arange(4).repeat(4)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    step = transition_log_probs(generator, rollout, samples[order], steps[order], guidance_scale=3.0, eta=ETA[family])
    ratio = torch.exp(step.log_prob.detach() - rollout.log_probs[samples[order], steps[order]])
    torch.testing.assert_close(ratio, torch.ones(16), atol=2e-4, rtol=0)
    # ... and the DDPO loss at ratio 1 is -mean(A)
    advantages = torch.linspace(-1, 1, 16)
    loss, _ = ppo_clip_loss(step.log_prob, rollout.log_probs[samples[order], steps[order]], advantages)
    assert loss.mean().item() == pytest.approx(-advantages.mean().item(), abs=1e-3)


def _objective_on_rollout(cls, options, generator, reward, batch_size=4):
    objective = cls(generator, options, reward=reward)

    class FakeTrainer:
        device = generator.device

        class config:
            seed = 0

        class accelerator:
            process_index = 0

    FakeTrainer.config.batch_size = batch_size
    objective.setup(FakeTrainer)
    objective.before_step(FakeTrainer, 0)
    return objective


def test_prdp_loss_and_gradient_are_zero_for_equal_rewards_at_theta_old(tiny_model_dir, prompt_file):
    """Exactly zero up to the fp32 rounding of re-evaluating a log-prob (|l| ~ 1e-7): the loss is
    below 1e-10 and the gradient a few thousandths of the gradient of the same batch with
    unequal rewards."""
    generator = lora_generator(tiny_model_dir, "sd")
    options = PRDPOptions(prompts=prompt_file, prompts_per_refresh=2, group_size=2, num_inference_steps=3,
                          guidance_scale=3.0, sample_chunk=8)
    largest = {}
    for name in ("test-constant", "test-brightness"):
        objective = _objective_on_rollout(PRDP, options, generator, rewards.load(name))
        assert objective.items.shape == (2 * 3, 3)  # 2 groups x 1 pair x 3 steps: (a, b, step)
        loss, metrics = objective.loss(None, torch.Generator().manual_seed(0))
        loss.backward()
        largest[name] = max(p.grad.abs().max().item() for p in generator.trainable_parameters())
        generator.denoiser.zero_grad(set_to_none=True)
        if name == "test-constant":
            assert metrics["target_abs"] == 0 and loss.item() < 1e-10
    assert largest["test-constant"] < 1e-2 * largest["test-brightness"]


def test_prdp_gradient_flows_to_the_lora_for_unequal_rewards_and_not_to_the_frozen_weights(tiny_model_dir,
                                                                                             prompt_file):
    generator = lora_generator(tiny_model_dir, "sd")
    for form in ("per_timestep", "summed"):
        options = PRDPOptions(prompts=prompt_file, prompts_per_refresh=2, group_size=3, num_inference_steps=3,
                              guidance_scale=3.0, form=form, kl_weight=0.1)
        objective = _objective_on_rollout(PRDP, options, generator, rewards.load("test-brightness"), batch_size=2)
        assert objective.items.shape == ((6 * 3, 3) if form == "per_timestep" else (6, 2 + 3))
        frozen = [p for p in generator.denoiser.parameters() if not p.requires_grad]
        seen = []
        hooks = [p.register_hook(lambda g, seen=seen: seen.append(g.abs().sum().item()))
                 for p in generator.trainable_parameters()]
        loss, metrics = objective.loss(None, torch.Generator().manual_seed(0))
        loss.backward()
        for h in hooks:
            h.remove()
        assert loss.item() > 0 and sum(seen) > 0 and metrics["target_abs"] > 0 and metrics["pairs"] == 6
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-12)  # LoRA starts at zero: policy = pretrained
        assert all(p.grad is None for p in frozen)
        generator.denoiser.zero_grad(set_to_none=True)


def test_ddpo_and_grpo_advantages_on_a_rollout(tiny_model_dir, prompt_file):
    generator = lora_generator(tiny_model_dir, "sd3")
    common = dict(prompts=prompt_file, prompts_per_refresh=2, group_size=3, num_inference_steps=3,
                  guidance_scale=3.0, eta=0.7)
    grpo = _objective_on_rollout(GRPO, GRPOOptions(**common, timestep_fraction=1.0), generator,
                                 rewards.load("test-brightness"))
    expected = group_advantages(grpo.rollout.rewards, 3)
    torch.testing.assert_close(grpo.rollout.advantages, expected)
    assert grpo.items.shape == (6 * 3, 2)
    loss, metrics = grpo.loss(None, torch.Generator().manual_seed(0))
    items = grpo.items[:4]
    assert loss.item() == pytest.approx(-grpo.rollout.advantages[items[:, 0]].clamp(-5, 5).mean().item(), abs=1e-3)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-10) and metrics["clipfrac"] == 0
    ddpo = _objective_on_rollout(DDPO, DDPOOptions(**common, timestep_fraction=0.5, pareto=True), generator,
                                 rewards.load("test-brightness"))
    # one reward: the Pareto front of each group is its best sample; int(3 x 0.5) = 1 step each
    assert ddpo.rollout.selected.sum().item() == 2 and ddpo.items.shape == (2 * 1, 2)
    assert set(ddpo.items[:, 0].tolist()) == set(ddpo.rollout.selected.nonzero().flatten().tolist())


# ------------------------------------------------------------------ the trainer, end to end


def _config(model, out, objective, options, *overrides):
    return load_config(TrainConfig, data={
        "model": {"path": str(model), "finetune": "lora", "lora": {"rank": 2, "alpha": 2}}, "objective": objective,
        "options": options, "batch_size": 4, "max_steps": 4, "seed": 0, "output_dir": str(out),
        "checkpoint_every": 0, "log_every": 1, "optim": {"lr": 1e-3},
    }, overrides=list(overrides))


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


def _options(prompt_file, family):
    return {"rewards": {"test-brightness": 1.0, "test-constant": 0.5}, "prompts": prompt_file,
            "prompts_per_refresh": 2, "group_size": 2, "refresh_every": 2, "num_inference_steps": 3,
            "guidance_scale": 3.0, "eta": ETA[family]}


@pytest.mark.parametrize("family,objective", [("sd", "ddpo"), ("sd3", "grpo"), ("sd3", "prdp")])
def test_trainer_runs_online_objectives(tiny_model_dir, prompt_file, tmp_path, family, objective):
    options = {**_options(prompt_file, family), "refresh_every": 1}
    if objective == "ddpo":
        options.update(stat_min_count=2)
    result = train(_config(tiny_model_dir(family), tmp_path, objective, options, "max_steps=2"))
    assert result.step == 2 and (result.final_weights / "pytorch_lora_weights.safetensors").is_file()
    rows = _metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) and r["reward/test-constant"] == 1.0 for r in rows)


@pytest.mark.parametrize("family,objective", [("sd", "prdp"), pytest.param("sd", "ddpo", marks=pytest.mark.slow),
                                              pytest.param("sd3", "grpo", marks=pytest.mark.slow)])
def test_trainer_resumes_online_objectives_exactly(tiny_model_dir, prompt_file, tmp_path, family, objective):
    from safetensors.torch import load_file

    options = {"rewards": {"test-brightness": 1.0, "test-constant": 0.5}, "prompts": prompt_file,
               "prompts_per_refresh": 2, "group_size": 2, "refresh_every": 2, "num_inference_steps": 3,
               "guidance_scale": 3.0, "eta": ETA[family]}
    if objective == "ddpo":
        options.update(stat_min_count=2)
    model = tiny_model_dir(family)
    straight = train(_config(model, tmp_path / "straight", objective, options))
    assert straight.step == 4
    rows = _metrics(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and "reward_mean" in r and "reward/test-brightness" in r for r in rows)
    assert rows[0]["reward/test-constant"] == 1.0
    # stop after step 3 (mid-rollout: the refresh of step 2 is still in use), then resume
    train(_config(model, tmp_path / "resumed", objective, options, "max_steps=3", "checkpoint_every=3"))
    resumed = train(_config(model, tmp_path / "resumed", objective, options, "resume=latest"))
    assert resumed.step == 4
    a = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert _metrics(tmp_path / "resumed")[-1]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4, abs=1e-9)
