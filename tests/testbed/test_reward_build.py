"""The testbed's learned reward: its build (quick mode), the symmetries it trains with, and the
shipped reward's agreement with the oracle on held-out prompts."""

import json
from pathlib import Path

import pytest
import torch

import rewards
from visalign.testbed.reward_build import (
    SHIPPED_REWARD,
    SUMMARY_NAME,
    build_testbed_reward,
    label_matrix,
    load_testbed_reward,
    rendered_agreement,
    symmetry,
    _things,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_reward(tmp_path_factory):
    from visalign.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("testbed-reward")
    model = save_tiny_model("sd", root / "model", seed=0)
    summary = build_testbed_reward(model, root / "reward", root / "work", quick=True)
    return root, summary


def test_quick_build_writes_a_loadable_reward_and_its_figures(quick_reward):
    root, summary = quick_reward
    assert summary["rendered_pairs"] > 0 and summary["train_sample_count"] > 0 and summary["heldout_sample_count"] > 0
    assert 0.0 <= summary["heldout_rendered"]["agreement"] <= 1.0
    assert set(summary["heldout_samples"]) >= {"correctness", "oracle_order", "per_category"}
    assert json.loads((root / "reward" / SUMMARY_NAME).read_text())["timings"]["total_s"] > 0
    reward = rewards.load(str(root / "reward"))
    assert reward.name == "hpsv2" and not any(p.requires_grad for p in reward.parameters())
    scores = reward(torch.rand(3, 3, 32, 32), ["a red circle", "two blue squares", "a circle and a square"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert (root / "reward" / "open_clip_model.safetensors").stat().st_size < 5e6  # fp16 weights


def test_quick_build_reuses_cached_samples(quick_reward):
    root, _ = quick_reward
    cached = sorted((root / "work").glob("samples-*.pt"))
    assert len(cached) == 2  # train and held-out samples


@pytest.mark.parametrize("index", range(8))
def test_symmetries_move_objects_with_the_pixels(index):
    from visalign.testbed.oracle import oracle
    from visalign.testbed.prompts import parse_prompt
    from visalign.testbed.render import render_batch, scene_for_prompt

    prompts = ["a red circle to the left of a blue square", "a green triangle above a yellow circle"]
    scenes = [scene_for_prompt(prompt, seed) for seed, prompt in enumerate(prompts)]
    images, objects = symmetry(render_batch(scenes), [_things(scene.objects) for scene in scenes], index)
    seen = [_things(found) for found in oracle(images.contiguous(), prompts).objects]
    specs = [parse_prompt(text) for text in prompts + [
        "a red circle to the right of a blue square", "a red circle above a blue square", "a red circle below a blue square",
        "a green triangle below a yellow circle", "a green triangle to the left of a yellow circle"]]
    assert torch.equal(label_matrix(objects, specs), label_matrix(seen, specs))
    # The first scene has its red circle clearly left of the blue square: the relation moves with the pixels.
    holds = dict(zip(("left", "right", "above", "below"), label_matrix(objects[:1], specs[:1] + specs[2:5])[0].tolist()))
    clearly = {0: ("left", "right"), 2: ("right", "left"), 4: ("left", "right"), 6: ("right", "left"),
               1: ("above", "below"), 3: ("above", "below"), 5: ("below", "above"), 7: ("below", "above")}[index]
    assert holds[clearly[0]] and not holds[clearly[1]]


def test_symmetry_numbers_are_checked():
    with pytest.raises(ValueError, match="0-7"):
        symmetry(torch.zeros(1, 3, 4, 4), [()], 8)


def test_clip_kind_trains_on_captions_only_and_loads_as_clip_score(tmp_path):
    from dataclasses import replace

    from visalign.testbed.reward_build import load_testbed_clip, quick_options

    options = replace(quick_options(), kind="clip", eval_samples_per_prompt=0)
    summary = build_testbed_reward(None, tmp_path / "clip", tmp_path / "work", options=options)
    assert summary["reward"] == "clip" and summary["train_sample_count"] == 0
    assert summary["options"]["preference_weight"] == 0.0
    reward = load_testbed_clip(tmp_path / "clip")
    assert reward.name == "clip" and rewards.load(str(tmp_path / "clip")).name == "clip"
    with pytest.raises(ValueError, match="kind must be one of"):
        build_testbed_reward(None, tmp_path / "x", tmp_path / "work", options=replace(options, kind="pick"))


def test_x0_calibration_labels_intermediates_by_their_final_sample(quick_reward):
    """sample_x0_and_read: at eta 0 the finals are sample_for_eval's images (same noise); the
    x0-predictions of each step are other images with the finals' oracle reading as labels."""
    from visalign.eval.evaluate import sample_for_eval
    from visalign.models import load_generator
    from visalign.testbed.reward_build import sample_x0_and_read

    root, _ = quick_reward
    generator = load_generator(root / "model")
    prompts = ["a red circle", "two blue squares"]
    finals, by_step = sample_x0_and_read(generator, prompts, 2, 3, 4.0, seed=5, x0_steps=[1, 0], eta=0.0)
    torch.testing.assert_close(finals.images, sample_for_eval(generator, prompts, 2, 3, 4.0, seed=5).clamp(0, 1))
    assert sorted(by_step) == [0, 1] and finals.prompts == ["a red circle"] * 2 + ["two blue squares"] * 2
    for x0 in by_step.values():
        assert x0.images.shape == finals.images.shape and not torch.allclose(x0.images, finals.images)
        assert x0.objects == finals.objects and torch.equal(x0.quality, finals.quality)
    assert (by_step[0].images - finals.images).abs().mean() > (by_step[1].images - finals.images).abs().mean()
    with pytest.raises(ValueError, match="x0_steps must be step indices"):
        sample_x0_and_read(generator, prompts, 1, 3, 4.0, seed=5, x0_steps=[3])


def test_value_agreement_scores_intermediates_against_the_final_verdict():
    """A reward that scores an image by its mean agrees on every pair when the trajectory that ends
    right has the brighter intermediate, and on none when it has the darker one."""
    from visalign.testbed.reward_build import LabelledImages, render_pairs, value_agreement

    rendered = render_pairs(["a red circle", "two blue squares"], 2, seed=0)  # rows 0-1 right, 2-3 wrong
    order = torch.tensor([0, 2, 1, 3])  # per prompt: (right, wrong)
    finals = LabelledImages(rendered.images[order], [rendered.objects[i] for i in order.tolist()],
                            [rendered.prompts[i] for i in order.tolist()], rendered.quality[order])
    bright = torch.tensor([0.9, 0.1, 0.8, 0.2])[:, None, None, None].expand(4, 3, 8, 8)
    mean = rewards.FunctionReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="mean")

    def intermediates(images):
        return LabelledImages(images, finals.objects, finals.prompts, finals.quality)

    figures = value_agreement(mean, {4: intermediates(bright), 8: intermediates(1 - bright)}, finals, per_prompt=2)
    assert figures == {"4": {"agreement": 1.0, "pairs": 2}, "8": {"agreement": 0.0, "pairs": 2}}


def test_reward_build_cli_with_x0_steps(tmp_path):
    """`python -m visalign.testbed.reward_build` parses option overrides (x0 steps as a list) and
    reports the intermediates' agreement per step."""
    from visalign.models.tiny import save_tiny_model
    from visalign.testbed.reward_build import main

    model = save_tiny_model("sd", tmp_path / "model", seed=0)
    main(["--out", str(tmp_path / "value"), "--model", str(model), "--quick", "--x0-steps", "0,1", "--steps", "2"])
    summary = json.loads((tmp_path / "value" / SUMMARY_NAME).read_text())
    assert summary["options"]["x0_steps"] == [0, 1] and summary["options"]["steps"] == 2
    assert summary["train_sample_count"] == 3 * 8  # 8 quick prompts x 1 sample: the finals and two x0 steps
    assert set(summary["heldout_x0"]) == {"0", "1"}
    assert rewards.load(str(tmp_path / "value")).name == "hpsv2"


def test_load_testbed_reward_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no testbed hpsv2 reward"):
        load_testbed_reward(tmp_path / "nothing")


shipped = pytest.mark.skipif(not (SHIPPED_REWARD / "open_clip_config.json").is_file(), reason="no shipped testbed reward")


@shipped
def test_shipped_reward_agrees_with_the_oracle_on_heldout_prompts():
    """Rendered held-out pairs (a right scene vs a one-attribute-wrong one): the shipped reward
    agrees with the oracle on most, a random-init scorer of the same architecture on about half."""
    from rewards.tiny import testbed_hpsv2_reward

    shipped_reward = rewards.load("testbed-reward")
    figures = rendered_agreement(shipped_reward, "heldout", pairs_per_prompt=2, seed=7)
    assert figures["pairs"] == 190 and figures["agreement"] >= 0.7, figures
    random_reward = rendered_agreement(testbed_hpsv2_reward(seed=3), "heldout", pairs_per_prompt=2, seed=7)
    assert random_reward["agreement"] < 0.62, random_reward


@shipped
def test_shipped_reward_passes_gradients_to_pixels_only():
    reward = rewards.load("testbed-reward")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(images, ["a red triangle", "a blue circle above a green square"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in reward.parameters())
    assert reward.differentiable and not reward.training


shipped_clip = pytest.mark.skipif(not (SHIPPED_REWARD.parent / "clip" / "open_clip_config.json").is_file(),
                                  reason="no shipped testbed CLIP reward")


@shipped_clip
def test_shipped_clip_reward_reads_captions_but_not_colour_binding():
    """The CLIP-score-style reward agrees with the oracle on most rendered held-out pairs, and,
    like real CLIP models (a bag of words), cannot tell "a red square and a blue circle" from
    the swapped colours: the documented failure that makes it a second, different reward."""
    clip = rewards.load("testbed-clip")
    assert clip.name == "clip" and clip.differentiable
    figures = rendered_agreement(clip, "heldout", pairs_per_prompt=4, seed=7)
    assert figures["agreement"] >= 0.7, figures
    assert figures["per_kind"]["colour"] >= 0.85 and figures["per_kind"]["swap"] <= 0.35, figures["per_kind"]


@shipped
@pytest.mark.slow
def test_shipped_reward_agrees_with_the_oracle_on_heldout_base_samples():
    """The documented figure (b): on pairs of base-model samples of held-out prompts where the
    oracle passes one and fails the other, the HPS-style reward prefers the right one (0.72 of 57
    pairs on the session-1 model it was built on; 0.65 of 106 on the model shipped since session 6,
    ``heldout_samples_current_base`` in reward_build.json); recomputed here from the same seeds."""
    from visalign.models import load_generator
    from visalign.testbed.reward_build import sample_and_read, sample_agreement

    summary = json.loads((SHIPPED_REWARD / SUMMARY_NAME).read_text())
    options = summary["options"]
    prompts = [record.prompt for record in __import__("visalign.testbed.prompts", fromlist=["x"]).load_prompts("heldout")]
    base_model = Path(summary["base_model"])
    generator = load_generator(base_model if base_model.is_absolute() else Path(__file__).resolve().parents[2] / base_model)
    samples = sample_and_read(generator, prompts, options["eval_samples_per_prompt"], options["sample_steps"],
                              options["guidance_scale"], summary["seed"] + 2)
    figures = sample_agreement(rewards.load("testbed-reward"), samples, options["eval_samples_per_prompt"])
    documented = summary.get("heldout_samples_current_base", summary["heldout_samples"])
    assert figures["correctness"] == pytest.approx(documented["correctness"], abs=0.06), figures
    assert figures["correctness"] >= 0.6
