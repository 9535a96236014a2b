"""The learned video reward (rewards.LearnedVideoReward) and the video testbed's build of it:
oracle-labelled pairs, a differentiable frozen scorer, a save/load round trip, training that
learns motion, and the shipped reward's documented agreement with the oracle."""

import json

import pytest
import torch

import rewards
from rewards.checkpoints import CheckpointError
from rewards.video import LearnedVideoReward, build_learned_video_reward
from visalign.testbed.video import parse_video_prompt, video_oracle, video_prompts
from visalign.testbed.video_reward import (
    BUILD_RECORD,
    SHIPPED_VIDEO_REWARD,
    VideoRewardBuildOptions,
    build_testbed_video_reward,
    clip_pair_agreement,
    load_testbed_video_reward,
    quick_options,
    render_clip_pairs,
    train_video_reward,
)

TRAIN = [spec.text for spec in video_prompts("train")]


@pytest.fixture(scope="module")
def pairs():
    return render_clip_pairs(TRAIN, 48, seed=3, num_frames=8)


def test_pairs_are_labelled_by_the_oracle(pairs):
    assert len(pairs) + pairs.dropped == 48 and pairs.winners.dtype == torch.uint8
    assert pairs.winners.shape == (len(pairs), 8, 3, 32, 32)
    assert video_oracle(pairs.winners.float() / 255, pairs.prompts).correct.all()
    assert not video_oracle(pairs.losers.float() / 255, pairs.prompts).correct.any()
    assert len(set(pairs.kinds)) >= 4


def test_learned_video_reward_is_frozen_and_differentiable_in_the_pixels(pairs):
    reward = build_learned_video_reward()
    assert reward.modality == "video" and reward.differentiable and reward.text_backbone_name == "testbed-clip"
    videos = (pairs.winners[:3].float() / 255).requires_grad_(True)
    scores = reward(videos, pairs.prompts[:3])
    assert scores.shape == (3,)
    scores.sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    other = reward(torch.nn.functional.interpolate(videos.detach().flatten(0, 1), size=64).view(3, 8, 3, 64, 64),
                   pairs.prompts[:3])
    assert other.shape == (3,)  # any frame size: resized to 32
    with pytest.raises(ValueError, match="pass prompts"):
        reward(videos.detach(), None)
    with pytest.raises(ValueError, match="at most 32"):
        reward(torch.zeros(1, 33, 3, 32, 32), ["a red circle moving left"])


def test_save_load_round_trip_and_bad_weights(pairs, tmp_path):
    reward = build_learned_video_reward()
    with torch.no_grad():
        reward.logit_scale.fill_(1.5)
    reward.save_pretrained(tmp_path / "vr")
    assert json.loads((tmp_path / "vr" / "reward.json").read_text())["reward"] == "learned-video"
    loaded = rewards.load_pretrained(tmp_path / "vr")
    assert isinstance(loaded, LearnedVideoReward)
    videos = pairs.winners[:4].float() / 255
    torch.testing.assert_close(loaded(videos, pairs.prompts[:4]), reward(videos, pairs.prompts[:4]))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_learned_video_reward(tmp_path / "vr", width=32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "video_reward.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        build_learned_video_reward(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no testbed video reward"):
        load_testbed_video_reward(tmp_path / "missing")


def _kind_pairs(kind, prompts, count, seed):
    from visalign.testbed import video as video_module

    original = video_module.mismatch_kinds
    video_module.mismatch_kinds = lambda category: (kind,)
    try:
        return render_clip_pairs(prompts, count, seed=seed, extra_objects=0)
    finally:
        video_module.mismatch_kinds = original


def _learns(kind, train_count, blocks, steps, lr):
    """Train on ``kind`` pairs of direction prompts in ``blocks`` runs of ``steps`` (each a fresh
    optimiser: warm restarts); returns held-out agreement before and after."""
    moving = [p for p in TRAIN if parse_video_prompt(p).category == "direction"]
    heldout = [spec.text for spec in video_prompts("heldout") if spec.category == "direction"]
    train, test = _kind_pairs(kind, moving, train_count, 0), _kind_pairs(kind, heldout, 96, 1)
    torch.manual_seed(0)
    reward = build_learned_video_reward()
    before = clip_pair_agreement(reward, test)["overall"]
    for block in range(blocks):
        train_video_reward(reward, train, VideoRewardBuildOptions(steps=steps, batch_size=32, lr=lr, seed=block),
                           progress=False)
    assert all(not p.requires_grad for p in reward.parameters())  # frozen again
    return before, clip_pair_agreement(reward, test)["overall"]


def test_training_learns_to_reject_teleports():
    """A short training on "jump" pairs (right direction, a teleport half-way) tells smooth clips
    from teleporting ones on held-out subjects, which the untrained reward cannot."""
    before, after = _learns("jump", 512, blocks=1, steps=150, lr=3e-3)
    assert after >= 0.85 and after > before + 0.25, (before, after)


@pytest.mark.slow
def test_training_learns_motion_direction():
    """The direction of motion against the prompt's direction word (about 4 minutes): learned late,
    after a plateau of some 1,200 steps, and only with warm restarts (10 runs of 150 steps at lr
    1e-3; one cosine run of 1,500 steps stays at chance: benchmarks/RESULTS.md)."""
    before, after = _learns("direction", 3000, blocks=10, steps=150, lr=1e-3)
    assert after >= 0.75 and after > before + 0.2, (before, after)


def test_quick_build_writes_a_loadable_reward_and_its_record(tmp_path):
    summary = build_testbed_video_reward(tmp_path / "vr", quick_options(), progress=False)
    record = json.loads((tmp_path / "vr" / BUILD_RECORD).read_text())
    assert record["pairs"]["train"] + record["pairs"]["heldout"] > 0 and "per_kind" in record["heldout_agreement"]
    assert summary["heldout_agreement"] == record["heldout_agreement"]
    reward = load_testbed_video_reward(tmp_path / "vr")
    assert isinstance(reward, LearnedVideoReward)


@pytest.mark.skipif(not (SHIPPED_VIDEO_REWARD / "reward.json").is_file(), reason="no shipped video reward")
def test_shipped_video_reward_agrees_with_the_oracle_on_heldout_pairs():
    """The documented figure (reward_build.json), recomputed on fresh held-out pairs."""
    record = json.loads((SHIPPED_VIDEO_REWARD / BUILD_RECORD).read_text())
    reward = rewards.load("testbed-video-reward")
    heldout = [spec.text for spec in video_prompts("heldout")]
    figures = clip_pair_agreement(reward, render_clip_pairs(heldout, 2 * len(heldout), seed=99))
    assert figures["overall"] >= 0.7 and abs(figures["overall"] - record["heldout_agreement"]["overall"]) < 0.08, figures
    # it sees smoothness (teleports, no motion) and speed; the prompt's direction and subject
    # are its documented blind spots (docs/video.md)
    assert figures["per_kind"]["jump"] >= 0.9 and figures["per_kind"]["static"] >= 0.9, figures["per_kind"]
