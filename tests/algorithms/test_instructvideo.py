"""InstructVideo (ALGORITHMS.md §11): the partial chain starts at t_tau (601 on SD's 20-step DDIM
grid), only the last step's denoiser call receives gradient, the temporal offset noise is constant
over space and varies over frames, the segmental reward samples one frame per segment, clip files
are read, resized, and skipped (counted) when unusable, and the trainer runs it."""

import json

import pytest
import torch

import rewards
from rewards import VideoFromImage
from rewards.tiny import tiny_clip_reward
from visalign.algorithms.instructvideo import ClipSet, InstructVideo, InstructVideoOptions, temporal_offset_noise
from visalign.config import ConfigError, load_config
from visalign.images import load_video, save_video
from visalign.models import load_generator

FRAMES = {"modelscope": 8, "animatediff": 8, "wan": 9}


@pytest.fixture(scope="module")
def reward():
    return tiny_clip_reward(seed=0, score_scale=10.0)


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    built = {}

    def get(family):
        if family not in built:
            gen = load_generator(tiny_model_dir(family), num_frames=FRAMES[family], height=32, width=32)
            with torch.no_grad():
                for i, p in enumerate(gen.add_lora(rank=2)):
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            built[family] = gen
        gen = built[family]
        gen.set_forward_module(None)
        for p in gen.trainable_parameters():
            p.grad = None
        return gen

    return get


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


def make(gen, reward, batch_size=2, **options):
    obj = InstructVideo(gen, InstructVideoOptions(**options), reward=reward)
    obj.bind(batch_size)
    return obj


def traced_loss(obj, seed=0):
    """Run one loss + backward; returns (timesteps of the denoiser calls, indices of the calls
    whose output received a gradient, metrics)."""
    timesteps, grads = [], set()

    def on_forward(module, args, kwargs, output):
        index = len(timesteps)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        timesteps.append(float(torch.as_tensor(t).flatten()[0]))
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda g, i=index: grads.add(i))

    handle = obj.generator.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        loss, metrics = obj.loss(None, rng(seed))
        loss.backward()
    finally:
        handle.remove()
    return timesteps, grads, metrics


@pytest.mark.parametrize("family, grad_steps", [("modelscope", 1), ("modelscope", 2), ("animatediff", 1)])
def test_chain_starts_at_t_tau_and_only_the_last_steps_get_gradient(generators, reward, family, grad_steps):
    gen = generators(family)
    obj = make(gen, reward, grad_steps=grad_steps, gradient_checkpointing="none")
    timesteps, grads, metrics = traced_loss(obj)
    # strength 0.6 on the 20-step DDIM grid 951, 901, ..., 1: t_tau = 601, then 551, ..., 1 (13 calls).
    assert obj.start == 7 and metrics["t_start"] == 601.0
    assert timesteps == [601.0 - 50 * i for i in range(13)]
    assert grads == set(range(13 - grad_steps, 13))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.trainable_parameters())


def test_flow_video_family_runs_the_same_partial_chain(generators, reward):
    gen = generators("wan")
    obj = make(gen, reward, num_inference_steps=10, gradient_checkpointing="none")
    timesteps, grads, metrics = traced_loss(obj)
    sigmas, _ = gen.sampling_timesteps(10)
    start = int((sigmas - 0.6).abs().argmin())
    assert obj.start == start and metrics["t_start"] == pytest.approx(float(sigmas[start]))
    assert len(timesteps) == 10 - start and grads == {10 - start - 1}


def test_checkpointing_each_call_gives_the_same_gradients(generators, reward):
    results = {}
    for mode in ("none", "steps"):
        gen = generators("modelscope")
        obj = make(gen, reward, num_inference_steps=10, grad_steps=2, gradient_checkpointing=mode)
        loss, _ = obj.loss(None, rng(5))
        loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in gen.trainable_parameters()])
    torch.testing.assert_close(results["steps"][0], results["none"][0])
    for got, expected in zip(results["steps"][1], results["none"][1]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_segmental_attenuated_reward_wraps_the_image_reward(generators, reward):
    gen = generators("modelscope")
    obj = make(gen, reward, num_inference_steps=6, segments=4, attenuation=1.0, gradient_checkpointing="none")
    assert isinstance(obj.reward, VideoFromImage) and obj.reward.reward is reward
    assert (obj.reward.segments, obj.reward.attenuation) == (4, 1.0)
    obj.loss(None, rng(1))
    indices = obj.reward.last_indices
    assert indices.shape == (2, 4)
    assert ((indices // 2) == torch.arange(4)).all()  # 8 frames, 4 segments of 2: one index per segment
    assert all(p.grad is None for p in reward.parameters())


def test_temporal_offset_noise_is_constant_over_space_and_varies_over_frames():
    shape = (2, 4, 8, 6, 6)
    plain = temporal_offset_noise(shape, 0.0, rng(3))
    offset = temporal_offset_noise(shape, 0.1, rng(3))
    difference = offset - plain  # the same eps, plus 0.1 * eps_offset [B, C, F, 1, 1]
    assert difference.flatten(3).std(-1).max() < 1e-6
    per_frame = difference[..., 0, 0]
    assert per_frame.std(-1).min() > 0.01 and per_frame.abs().max() < 0.5


def test_refusals(generators, tiny_model_dir, reward):
    with pytest.raises(ConfigError, match="image family"):
        InstructVideo(load_generator(tiny_model_dir("sd")), InstructVideoOptions(), reward=reward)
    gen = generators("modelscope")
    with pytest.raises(ConfigError, match="not differentiable"):
        InstructVideo(gen, InstructVideoOptions(), reward=rewards.load("testbed-video-oracle"))
    with pytest.raises(ConfigError, match="grad_steps=14 exceeds the 13 steps"):
        InstructVideo(gen, InstructVideoOptions(grad_steps=14), reward=reward)
    with pytest.raises(ConfigError, match="strength"):
        InstructVideo(gen, InstructVideoOptions(strength=0.0), reward=reward)


def _write_clip(path, frames, size=40, seed=0):
    video = torch.rand((frames, 3, size, size + 8), generator=rng(seed))
    save_video(video, path)
    return video


def test_clip_files_are_read_resized_windowed_and_bad_ones_skipped(tmp_path, caplog):
    _write_clip(tmp_path / "long.gif", 12)
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(frames / f"{i:03d}.png")
    _write_clip(tmp_path / "short.gif", 3)
    (tmp_path / "broken.gif").write_bytes(b"not a gif")
    rows = [{"video": "long.gif", "caption": "a red circle moving left"},
            {"video": "frames", "caption": "a red square appearing"},
            {"video": "short.gif", "caption": "too short"},
            {"video": "broken.gif", "caption": "corrupt"}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    clips = ClipSet(str(tmp_path), num_frames=4, height=32, width=32, frame_stride=2)
    assert clips.captions == ["a red circle moving left", "a red square appearing"]
    assert clips.skipped == {"too_short": 1, "unreadable": 1}
    videos, captions = clips.draw(6, rng(0))
    assert videos.shape == (6, 4, 3, 32, 32) and 0 <= videos.min() and videos.max() <= 1
    ramp = [v for v, c in zip(videos, captions) if c == "a red square appearing"][0][:, 0, 0, 0]
    assert torch.allclose(ramp[1:] - ramp[:-1], torch.full((3,), 60 / 255), atol=1e-3)  # every 2nd frame
    with pytest.raises(ConfigError, match="no clip list"):
        ClipSet(str(tmp_path / "missing.jsonl"), 4, 32, 32)


def test_load_video_reads_files_and_folders_and_names_bad_input(tmp_path):
    written = _write_clip(tmp_path / "clip.gif", 5, size=16)
    read = load_video(tmp_path / "clip.gif")
    assert read.shape == (5, 3, 16, 24)
    assert (read - written).abs().mean() < 0.05  # GIF palette quantisation
    with pytest.raises(ValueError, match="no clip at"):
        load_video(tmp_path / "nothing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="bad.mp4: cannot read the video"):
        load_video(tmp_path / "bad.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no frame images"):
        load_video(tmp_path / "empty")


def _edit_reward(gen, judge, prompts, clips):
    """The reward of a fixed InstructVideo edit (same clips, noise and frames) without gradient."""
    obj = InstructVideo(gen, InstructVideoOptions(num_inference_steps=6, attenuation=0.0, frame_sampling="middle"),
                        reward=judge)
    with torch.no_grad():
        x0 = gen.encode(clips, sample=False)
        t_tau = gen.sampling_timesteps(6)[0][obj.start]
        x_t = gen.add_noise(x0, temporal_offset_noise(tuple(x0.shape), 0.1, rng(9)), t_tau)
        videos = gen.sample(prompts, latents=x_t, start_step=obj.start, num_inference_steps=6, guidance_scale=3.0).images
        return obj.reward(videos, prompts).mean().item()


def test_trainer_runs_instructvideo_and_raises_the_reward(tiny_model_dir, tmp_path):
    from visalign.testbed.video import clip_for_prompt, render_clips
    from visalign.training import TrainConfig, train

    rewards.register("test-tiny-clip", lambda: tiny_clip_reward(seed=0, score_scale=10.0), overwrite=True)
    gen = load_generator(tiny_model_dir("modelscope"), num_frames=8, height=32, width=32)
    judge = tiny_clip_reward(seed=0, score_scale=10.0)
    prompts = ["a red circle moving left", "a blue square moving up"]
    import numpy as np

    clips = render_clips([clip_for_prompt(p, np.random.default_rng(i)) for i, p in enumerate(prompts)])
    before = _edit_reward(gen, judge, prompts, clips)
    config = load_config(TrainConfig, data={
        "model": {"path": str(tiny_model_dir("modelscope")), "lora": {"rank": 4}}, "objective": "instructvideo",
        "options": {"reward": "test-tiny-clip", "videos": "testbed-video:train", "num_inference_steps": 6},
        "optim": {"lr": 3e-2, "weight_decay": 0.0}, "batch_size": 2, "max_steps": 6, "log_every": 1,
        "checkpoint_every": 0, "output_dir": str(tmp_path / "run"), "seed": 0,
    })
    result = train(config, generator=gen)
    assert result.step == 6 and (result.final_weights / "pytorch_lora_weights.safetensors").is_file()
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and all(row["t_start"] == 665.0 for row in logged)  # 0.6 on the 6-step grid 831, 665, ..., 1
    assert _edit_reward(gen, judge, prompts, clips) > before + 0.05


def test_recipe_carries_the_published_defaults():
    from pathlib import Path

    from visalign.training import TrainConfig, build_objective

    config = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "assets" / "configs" / "modelscope_instructvideo.yaml")
    assert config.objective == "instructvideo" and config.model.family == "modelscope"
    options = build_objective(config.objective, None, config.options).options
    expected = {"num_inference_steps": 20, "strength": 0.6, "offset_noise": 0.1, "grad_steps": 1, "guidance_scale": 3.0,
                "eta": 0.0, "segments": 4, "attenuation": 1.0, "reward": "hpsv2", "gradient_checkpointing": "steps"}
    assert {key: getattr(options, key) for key in expected} == expected
    assert config.model.finetune == "lora" and config.model.lora.rank == 4 and config.optim.lr == 1e-5


def test_prompts_option_is_refused_since_captions_come_from_the_clips(generators, reward):
    with pytest.raises(ConfigError, match="options.prompts is not used"):
        InstructVideo(generators("modelscope"), InstructVideoOptions(prompts="testbed:heldout"), reward=reward)
