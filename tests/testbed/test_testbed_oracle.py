"""The exact oracle: 100% on renders, rejects mismatches, tolerant of blur and noise, fast."""

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards
from rewards.base import Reward
from visalign.testbed.oracle import OracleConfig, OracleReward, label_components, oracle, segment
from visalign.testbed.prompts import CATEGORIES, all_prompts, satisfies
from visalign.testbed.render import (
    SHAPES,
    Scene,
    SceneObject,
    mismatch_kinds,
    mismatched_scene,
    render,
    render_batch,
    sample_scene,
    scene_for_prompt,
    well_separated,
)

PER_CATEGORY = 40


def _ground_truth(seed: int, per_category: int = PER_CATEGORY) -> tuple[list[str], list[Scene]]:
    """``per_category`` random prompts of every category with a matching scene each."""
    rng = np.random.default_rng(seed)
    prompts, scenes = [], []
    for category in CATEGORIES:
        specs = [spec for spec in all_prompts() if spec.category == category]
        for index in rng.choice(len(specs), size=per_category):
            prompts.append(specs[index].text)
            scenes.append(scene_for_prompt(specs[index], rng, extra_objects=int(rng.integers(0, 2))))
    return prompts, scenes


def _moved(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with its objects turned in place and the layout shifted, if a valid move is found."""
    for _ in range(100):
        turned = Scene(
            tuple(replace(obj, rotation=float(rng.uniform(0, 360))) for obj in scene.objects), scene.background
        )
        moved = turned.translated(*rng.uniform(-0.15, 0.15, size=2))
        if moved.fits(margin=0.05) and well_separated(moved):
            return moved
    return None


@pytest.fixture(scope="module")
def ground_truth():
    return _ground_truth(seed=0)


def _assert_all_correct(result, prompts):
    wrong = [(prompts[i], result.reasons[i], result.objects[i]) for i in (~result.correct).nonzero().flatten().tolist()]
    assert not wrong, wrong[:3]


def test_oracle_is_exact_on_renders_of_every_category(ground_truth):
    prompts, scenes = ground_truth
    result = oracle(render_batch(scenes), prompts)
    _assert_all_correct(result, prompts)
    assert result.per_category == {category: 1.0 for category in CATEGORIES}
    assert result.categories == [c for c in CATEGORIES for _ in range(PER_CATEGORY)]
    assert result.reasons == [""] * len(prompts)


def test_oracle_is_exact_on_rotated_and_shifted_scenes(ground_truth):
    prompts, scenes = ground_truth
    rng = np.random.default_rng(1)
    pairs = [(prompt, _moved(scene, rng)) for prompt, scene in zip(prompts, scenes)]
    pairs = [(prompt, scene) for prompt, scene in pairs if scene is not None]
    assert len(pairs) >= 0.9 * len(scenes)  # a crowded scene may have no room to move
    prompts, moved = zip(*pairs)
    # Shifting keeps relative positions, so the prompt still holds; check, then render.
    assert all(satisfies(p, s.objects) for p, s in zip(prompts, moved))
    _assert_all_correct(oracle(render_batch(moved), prompts), prompts)


@pytest.mark.parametrize("size, supersample", [(64, 4), (64, 1)])
def test_oracle_is_exact_at_64_pixels_with_and_without_antialiasing(size, supersample):
    prompts, scenes = _ground_truth(seed=2, per_category=8)
    _assert_all_correct(oracle(render_batch(scenes, size, supersample), prompts), prompts)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_are_read_at_every_rotation_size_and_place(shape):
    rng = np.random.default_rng(3)
    scenes = [
        Scene((SceneObject(shape, colour, *rng.uniform(0.3, 0.7, size=2), rng.uniform(0.1, 0.2), rotation),), background)
        for rotation in np.linspace(0, 120, 24)
        for colour, background in (("red", "white"), ("green", "black"), ("blue", "light grey"), ("yellow", "dark grey"))
    ]
    found = segment(render_batch(scenes)).objects
    assert [len(objects) for objects in found] == [1] * len(scenes)
    assert [objects[0].shape for objects in found] == [shape] * len(scenes)
    assert [objects[0].colour for objects in found] == [scene.objects[0].colour for scene in scenes]


@pytest.mark.parametrize("category", CATEGORIES)
def test_oracle_rejects_every_kind_of_mismatch(category):
    rng = np.random.default_rng(4)
    specs = [spec for spec in all_prompts() if spec.category == category]
    prompts, scenes, kinds = [], [], []
    for kind in mismatch_kinds(category):
        for index in rng.choice(len(specs), size=12):
            prompts.append(specs[index].text)
            scenes.append(mismatched_scene(specs[index], rng, kind=kind))
            kinds.append(kind)
    result = oracle(render_batch(scenes), prompts)
    accepted = [(kinds[i], prompts[i], result.objects[i]) for i in result.correct.nonzero().flatten().tolist()]
    assert not accepted, accepted[:3]
    assert all(result.reasons), "every rejection gives a reason"


def test_swapped_attributes_are_rejected_by_name():
    prompt = "a red square and a blue circle"
    swapped = Scene((SceneObject("square", "blue", 0.3, 0.5, 0.14), SceneObject("circle", "red", 0.7, 0.5, 0.14)), "white")
    right = Scene((SceneObject("square", "red", 0.3, 0.5, 0.14), SceneObject("circle", "blue", 0.7, 0.5, 0.14)), "white")
    result = oracle(render_batch([swapped, right]), [prompt, prompt])
    assert result.correct.tolist() == [False, True]
    assert result.reasons[0] == "no red square"


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    taps = torch.exp(-torch.arange(-radius, radius + 1).float() ** 2 / (2 * sigma**2))
    taps = (taps / taps.sum()).repeat(3, 1, 1, 1)
    images = F.pad(images, (radius,) * 4, mode="replicate")
    images = F.conv2d(images, taps.view(3, 1, 1, -1), groups=3)
    return F.conv2d(images, taps.view(3, 1, -1, 1), groups=3)


def test_oracle_tolerates_mild_blur_and_noise(ground_truth):
    prompts, scenes = ground_truth
    images = render_batch(scenes)
    _assert_all_correct(oracle(_blur(images, 0.75), prompts), prompts)
    noise = 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    _assert_all_correct(oracle((images + noise).clamp(0, 1), prompts), prompts)


def test_quality_is_one_on_renders_and_falls_with_blur_noise_and_cropping(ground_truth):
    prompts, scenes = ground_truth
    images = render_batch(scenes[:48])
    quality = oracle(images, prompts[:48]).quality
    assert quality.dtype == torch.float32 and torch.all(quality == 1.0)
    blurred = oracle(_blur(images, 1.0), prompts[:48]).quality
    assert torch.all(blurred < 0.95)
    noisy = oracle((images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), prompts[:48]).quality
    assert torch.all(noisy < 0.95)
    inside = Scene((SceneObject("circle", "red", 0.5, 0.5, 0.15),), "white")
    cropped = Scene((SceneObject("circle", "red", 0.02, 0.5, 0.15),), "white")
    quality = oracle(render_batch([inside, cropped]), ["a circle"] * 2).quality
    assert quality[0] == 1.0 and quality[1] < 0.8
    empty = oracle(render_batch([Scene((), "black")]), ["a circle"])
    assert not empty.correct[0] and empty.quality[0] < 0.5 and empty.reasons[0] == "no circle"


def test_components_follow_colour_and_eight_connectivity():
    colour_index = torch.full((1, 6, 6), -1)
    colour_index[0, 0, 0] = colour_index[0, 1, 1] = 0  # diagonal neighbours: one component
    colour_index[0, 0, 2] = 1  # touches the first but has another colour
    colour_index[0, 4:, 4:] = 0  # apart: a second component of colour 0
    labels = label_components(colour_index)
    assert labels[0, 0, 0] == labels[0, 1, 1] == 1
    assert labels[0, 0, 2] == 3
    assert labels[0, 4:, 4:].unique().tolist() == [4 * 6 + 4 + 1]
    assert (labels[colour_index < 0] == 0).all()
    # A long snake converges to one label too.
    snake = torch.full((1, 9, 9), -1)
    snake[0, ::2, :] = 2
    snake[0, 1::4, -1] = 2
    snake[0, 3::4, 0] = 2
    assert label_components(snake)[snake >= 0].unique().tolist() == [1]


def test_specks_are_not_objects():
    image = render(Scene((SceneObject("square", "blue", 0.5, 0.5, 0.15),), "white"))
    image[:, 3, 3] = torch.tensor([0.86, 0.12, 0.12])  # one red pixel
    assert [obj.shape for obj in segment(image[None]).objects[0]] == ["square"]
    config = OracleConfig(min_area=0.0)
    assert len(segment(image[None], config).objects[0]) == 2


def test_oracle_errors():
    images = render_batch([sample_scene(0)])
    with pytest.raises(ValueError, match="got 1 images but 2 prompts"):
        oracle(images, ["a circle", "a square"])
    with pytest.raises(ValueError, match="cannot parse 'a purple circle'"):
        oracle(images, ["a purple circle"])
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        oracle(images[0], ["a circle"])
    empty = oracle(torch.zeros(0, 3, 32, 32), [])
    assert empty.correct.shape == empty.quality.shape == (0,) and empty.per_category == {}


def test_oracle_scores_256_images_fast():
    prompts, scenes = _ground_truth(seed=5, per_category=43)
    images, prompts = render_batch(scenes[:256]), prompts[:256]
    oracle(images[:8], prompts[:8])  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # timing on one core; the suite may share the machine
    try:
        start = time.process_time()
        oracle(images, prompts)
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 1.5, f"oracle took {elapsed:.2f} s of CPU for 256 images"


def test_oracle_reward_protocol(ground_truth):
    prompts, scenes = ground_truth
    images = render_batch(scenes[:6] + [mismatched_scene(prompts[0], 0)])
    prompts = prompts[:6] + [prompts[0]]
    reward = OracleReward()
    assert isinstance(reward, Reward) and isinstance(reward, torch.nn.Module)
    assert (reward.name, reward.differentiable, reward.modality) == ("testbed-oracle", False, "image")
    scores = reward(images, prompts)
    assert scores.shape == (7,) and scores.dtype == torch.float32
    assert scores.tolist() == [1.0] * 6 + [0.0]
    quality = OracleReward(mode="quality")(images, prompts)
    both = OracleReward(mode="both", quality_weight=0.25)(images, prompts)
    assert torch.allclose(both, 0.75 * scores + 0.25 * quality)
    loaded = rewards.load("testbed-oracle", mode="quality")
    assert isinstance(loaded, OracleReward) and torch.equal(loaded(images, prompts), quality)
    assert reward(images[:1], prompts[0]).shape == (1,)  # one prompt for the batch


def test_oracle_reward_errors():
    with pytest.raises(ValueError, match="unknown oracle reward mode 'best'"):
        OracleReward(mode="best")
    with pytest.raises(ValueError, match="quality_weight"):
        OracleReward(mode="both", quality_weight=2.0)
    with pytest.raises(ValueError, match="needs the prompt"):
        OracleReward()(render_batch([sample_scene(0)]), None)


def test_geneval_score_weighs_categories_equally():
    """Three right single-object images and one wrong position image: 3/4 of the images are
    right, but GenEval's overall score is the mean of 1.0 and 0.0."""
    from visalign.testbed.render import mismatched_scene, scene_for_prompt

    prompts = ["a red circle", "a blue square", "a green triangle", "a red circle to the left of a blue square"]
    scenes = [scene_for_prompt(prompt, seed) for seed, prompt in enumerate(prompts[:3])]
    scenes.append(mismatched_scene(prompts[3], 0, kind="position"))
    result = oracle(render_batch(scenes), prompts)
    assert result.correct.tolist() == [True, True, True, False], result.reasons
    assert result.accuracy == pytest.approx(0.75)
    assert result.geneval_score == pytest.approx(0.5)
    assert math.isnan(oracle(torch.zeros(0, 3, 32, 32), []).geneval_score)


def test_attribute_recall_hand_values_and_exact_on_renders(ground_truth):
    """Swapped colours get every colour and shape but no colour-shape pair; a missing object
    halves the shape recall; prompts without colours do not count towards the colour kinds."""
    prompts = ["a red square and a blue circle", "a red circle", "a circle and a square"]
    scenes = [Scene((SceneObject("square", "blue", 0.3, 0.5, 0.14), SceneObject("circle", "red", 0.7, 0.5, 0.14)), "white"),
              scene_for_prompt("a red circle", 0),
              Scene((SceneObject("circle", "green", 0.5, 0.5, 0.2),), "black")]
    result = oracle(render_batch(scenes), prompts)
    assert result.correct.tolist() == [False, True, False], result.reasons
    assert result.recall == pytest.approx({"colour": 1.0, "shape": (1 + 1 + 0.5) / 3, "colour_shape": 0.5})
    prompts, scenes = ground_truth
    assert oracle(render_batch(scenes), prompts).recall == {"colour": 1.0, "shape": 1.0, "colour_shape": 1.0}
    assert oracle(torch.zeros(0, 3, 32, 32), []).recall == {}
