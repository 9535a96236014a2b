"""The video testbed (prompts, clips, the exact video oracle), and steering the video families
with video rewards through the same pipelines as images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards import FrameAverage, FunctionReward, TemporalConsistency, VideoFromImage
from visalign.testbed import PromptParseError
from visalign.testbed.prompts import HELDOUT_PAIRS
from visalign.testbed.render import render
from visalign.testbed.video import (
    VIDEO_CATEGORIES,
    VideoOracleReward,
    all_video_prompts,
    clip_for_prompt,
    mismatch_kinds,
    mismatched_clip,
    parse_video_prompt,
    render_clip,
    render_clips,
    video_oracle,
    video_prompts,
)

SPECS = all_video_prompts()


def test_prompts_parse_round_trip_and_split():
    assert len(SPECS) == 15 * 14 and {spec.category for spec in SPECS} == set(VIDEO_CATEGORIES)
    for spec in SPECS:
        assert parse_video_prompt(spec.text) == spec
    spec = parse_video_prompt("A Red Circle moving left quickly.")
    assert (spec.category, spec.subject.colour, spec.subject.shape, spec.direction, spec.speed) == ("speed", "red", "circle", "left", "quickly")
    assert parse_video_prompt("a triangle appearing").category == "appearing"
    for bad in ("a red circle", "two red circles moving left", "a red circle and a blue square moving up",
                "a red circle moving sideways", "a circle moving left slowly quickly"):
        with pytest.raises(PromptParseError):
            parse_video_prompt(bad)
    train, heldout = video_prompts("train"), video_prompts("heldout")
    pairs = lambda specs: {(s.subject.colour, s.subject.shape) for s in specs if s.subject.colour}  # noqa: E731
    assert pairs(heldout) == set(HELDOUT_PAIRS) and not pairs(train) & set(HELDOUT_PAIRS)
    assert {s for s in train if s.subject.colour is None} == {s for s in heldout if s.subject.colour is None}


def test_oracle_is_right_on_every_rendered_ground_truth_clip():
    rng = np.random.default_rng(0)
    specs = SPECS[::3]  # 70 clips: 14 motions per subject, so every subject, category and direction
    clips = [clip_for_prompt(spec, rng, extra_objects=index % 2) for index, spec in enumerate(specs)]
    videos = render_clips(clips)
    assert videos.shape == (len(specs), 8, 3, 32, 32)
    result = video_oracle(videos, [spec.text for spec in specs])
    assert result.accuracy == 1.0, [(s.text, r) for s, r in zip(specs, result.reasons) if r][:5]
    assert set(result.per_category) == set(VIDEO_CATEGORIES) and result.reasons == [""] * len(specs)
    assert result.smoothness.min() > 0.9 and result.quality.min() > 0.9


def test_oracle_is_right_on_wan_length_clips():
    rng = np.random.default_rng(1)
    specs = SPECS[::7]
    for frames in (5, 9):
        videos = render_clips([clip_for_prompt(spec, rng, num_frames=frames, extra_objects=1) for spec in specs])
        assert video_oracle(videos, [spec.text for spec in specs]).accuracy == 1.0


def test_oracle_rejects_wrong_direction_clips_and_names_the_direction():
    rng = np.random.default_rng(2)
    specs = [spec for spec in SPECS if spec.category == "direction"]
    prompts, clips = [], []
    for spec in specs:
        for kind in ("direction", "axis"):
            clips.append(mismatched_clip(spec, rng, kind))
            prompts.append(spec.text)
    result = video_oracle(render_clips(clips), prompts)
    assert not result.correct.any()
    for prompt, clip, reason in zip(prompts, clips, result.reasons):
        start, end = clip.frames[0].objects[0], clip.frames[-1].objects[0]
        dx, dy = end.x - start.x, end.y - start.y
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert reason == f"the object moves {moved}, expected {parse_video_prompt(prompt).direction}"


@pytest.mark.parametrize("category", VIDEO_CATEGORIES)
def test_oracle_rejects_every_kind_of_mismatch(category):
    rng = np.random.default_rng(3)
    specs = [spec for spec in SPECS if spec.category == category][::7]
    prompts, clips, kinds = [], [], []
    for spec in specs:
        for kind in mismatch_kinds(category):
            clips.append(mismatched_clip(spec, rng, kind, extra_objects=int(rng.integers(2))))
            prompts.append(spec.text)
            kinds.append(kind)
    result = video_oracle(render_clips(clips), prompts)
    assert not result.correct.any(), [(p, k) for p, k, ok in zip(prompts, kinds, result.correct) if ok]
    for kind, reason, smooth in zip(kinds, result.reasons, result.smoothness):
        if kind == "jump":
            assert reason.startswith("the motion is not smooth") and smooth < 0.8
        if kind == "static":
            assert "does not move" in reason or "there all along" in reason
        if kind == "reverse":
            assert "expected it" in reason


def test_appearing_clip_blends_the_subject_in():
    clip = clip_for_prompt("a blue triangle appearing", rng=4, extra_objects=1)
    assert clip.opacity[0] == 0.0 and clip.opacity[-1] == 1.0 and list(clip.opacity) == sorted(clip.opacity)
    video = render_clip(clip)
    scene = clip.frames[0]
    without = render(type(scene)(scene.objects[1:], scene.background))
    torch.testing.assert_close(video[0], without)  # not there yet: the frame without it
    torch.testing.assert_close(video[-1], render(clip.frames[-1]))
    result = video_oracle(video[None], ["a blue triangle appearing"])
    track = result.tracks[0]
    assert not track[0] and track[-1] and track[-1][0].colour == "blue"


def test_oracle_reward_modes_and_errors():
    rng = np.random.default_rng(5)
    good = render_clip(clip_for_prompt("a red circle moving left", rng))
    jumpy = render_clip(mismatched_clip("a red circle moving left", rng, "jump"))
    videos, prompts = torch.stack([good, jumpy]), ["a red circle moving left"] * 2
    reward = VideoOracleReward()
    assert reward.modality == "video" and not reward.differentiable
    torch.testing.assert_close(reward(videos, prompts), torch.tensor([1.0, 0.0]))
    smooth = VideoOracleReward(mode="smoothness")(videos, prompts)
    assert smooth[0] > 0.9 > smooth[1]
    both = VideoOracleReward(mode="both", smoothness_weight=0.25)(videos, prompts)
    torch.testing.assert_close(both, 0.75 * torch.tensor([1.0, 0.0]) + 0.25 * smooth)
    with pytest.raises(ValueError, match="prompt of every clip"):
        reward(videos, None)
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        reward(videos[:, 0], prompts)
    with pytest.raises(ValueError, match="mode"):
        VideoOracleReward(mode="speed")


# ------------------------------------------------------- steering the video families


@pytest.fixture(scope="module")
def video_generators(tiny_model_dir):
    from visalign.models import load_generator

    return {
        "modelscope": load_generator(tiny_model_dir("modelscope"), num_frames=4, height=32, width=32),
        "animatediff": load_generator(tiny_model_dir("animatediff"), num_frames=4, height=32, width=32),
        "wan": load_generator(tiny_model_dir("wan"), num_frames=5, height=32, width=32),
    }


def _brightness(images, prompts):
    return images.flatten(1).mean(1)


@pytest.mark.parametrize("family", ["modelscope", "animatediff", "wan"])
def test_best_of_n_and_fk_steer_video_generators_with_video_rewards(video_generators, family):
    from pipelines import BestOfN, FKSteering

    generator = video_generators[family]
    frames = generator.num_frames
    prompts = ["a red circle moving left", "a blue square appearing"]
    segmental = VideoFromImage(FunctionReward(_brightness, name="brightness"), segments=2, sampling="middle")
    best = BestOfN(generator, segmental, n=2)(prompts, num_inference_steps=2, guidance_scale=2.0,
                                                generator=torch.Generator().manual_seed(0))
    plain = generator.sample(prompts, num_inference_steps=2, guidance_scale=2.0, num_images_per_prompt=2,
                             generator=torch.Generator().manual_seed(0))
    assert best.images.shape == (2, frames, 3, 32, 32) and best.particles.shape == (2, 2, frames, 3, 32, 32)
    assert torch.equal(best.particles.flatten(0, 1), plain.images)
    expected = segmental(plain.images, [p for p in prompts for _ in range(2)]).view(2, 2)
    torch.testing.assert_close(best.particle_rewards, expected)
    torch.testing.assert_close(best.rewards, expected.max(1).values)

    for reward in (TemporalConsistency(), FrameAverage(FunctionReward(_brightness, name="brightness")), VideoOracleReward()):
        out = FKSteering(generator, reward, num_particles=2, resample_start=0, resample_every=1)(
            prompts, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
        assert out.images.shape == (2, frames, 3, 32, 32) and out.particles.shape == (2, 2, frames, 3, 32, 32)
        torch.testing.assert_close(out.rewards, reward(out.images, prompts), atol=1e-5, rtol=1e-5)
        assert out.diagnostics.reward_evals > 4  # intermediate x0 predictions were scored too


def test_the_video_oracle_is_a_registered_reward():
    import rewards

    reward = rewards.load("testbed-video-oracle", mode="smoothness")
    assert isinstance(reward, VideoOracleReward) and reward.mode == "smoothness" and reward.modality == "video"


def test_docs_example_runs_and_prints_what_it_says(capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "video.md"
    text = doc.read_text()
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", text[text.index("### From Python"):], re.S)[:2]
    exec(compile(code, str(doc), "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out == printed
