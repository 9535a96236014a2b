"""The video testbed's base model (visalign.testbed.video_model): a motion adapter trained on the
testbed SD model. Zero-initialised adapter = the image model frame by frame; imperfect captions
that the oracle rejects; training that moves only the motion modules; the shipped adapter's
record and loading."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from visalign.models import ModelLoadError, load_generator
from visalign.models.video import AnimateDiffGenerator
from visalign.testbed.video import parse_video_prompt, video_oracle, video_prompts
from visalign.testbed.video_model import (
    ASSETS,
    BUILD_RECORD,
    CAPTION_MISTAKES,
    SHIPPED_VIDEO_MODEL,
    VideoModelBuildOptions,
    load_testbed_video_model,
    new_motion_adapter,
    train_motion_adapter,
    training_clips,
)

SD = ASSETS / "sd"
TRAIN = [spec.text for spec in video_prompts("train")]


@pytest.fixture(scope="module")
def fresh():
    adapter = new_motion_adapter(UNet2DConditionModel.load_config(SD, subfolder="unet"), seed=0)
    return AnimateDiffGenerator.from_pretrained(str(SD), motion_adapter=adapter, num_frames=4)


def test_zero_initialised_adapter_predicts_each_frame_as_the_image_model(fresh):
    image = load_generator(SD)
    latents = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700, 300])
    cond = fresh.encode_prompt(["a red circle moving left", "a square appearing"])
    with torch.no_grad():
        video = fresh.predict(latents, t, cond)
        frames = image.predict(latents.transpose(1, 2).flatten(0, 1), t.repeat_interleave(4), cond.repeat_interleave(4))
    torch.testing.assert_close(video, frames.unflatten(0, (2, 4)).transpose(1, 2), atol=1e-5, rtol=1e-4)
    # ... and an adapter that is not zero-initialised does not (the test can fail).
    with torch.no_grad():
        for name, param in fresh.denoiser.named_parameters():
            if "motion_modules" in name and name.endswith("proj_out.weight"):
                param.add_(0.1)
        moved = fresh.predict(latents, t, cond)
        for name, param in fresh.denoiser.named_parameters():
            if "motion_modules" in name and name.endswith("proj_out.weight"):
                param.sub_(0.1)
    assert (moved - video).abs().max() > 1e-3


def test_training_clips_are_miscaptioned_only_by_caption_mistakes():
    rng = np.random.default_rng(0)
    clean, captions, wrong = training_clips(TRAIN, 24, rng, caption_noise=0.0, num_frames=8)
    assert clean.shape == (24, 8, 3, 32, 32) and wrong == 0
    assert video_oracle(clean, captions).correct.all()
    noisy, captions, wrong = training_clips(TRAIN, 24, rng, caption_noise=1.0, num_frames=8)
    result = video_oracle(noisy, captions)
    assert wrong == 24 and not result.correct.any()
    # A caption's mistake, never a defect of the clip: the tracked object moves smoothly when it moves.
    moving = [i for i, caption in enumerate(captions) if parse_video_prompt(caption).category in ("direction", "speed")]
    assert "jump" not in CAPTION_MISTAKES and "identity" not in CAPTION_MISTAKES
    assert moving and not any("not smooth" in result.reasons[i] or "changes colour" in result.reasons[i] for i in moving)


def test_training_moves_only_the_motion_modules(fresh):
    before = {name: param.detach().clone() for name, param in fresh.denoiser.named_parameters()}
    options = VideoModelBuildOptions(steps=2, batch_size=2, warmup=1, num_frames=4, lr=1e-2)
    history = train_motion_adapter(fresh, options, progress=False)
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)
    changed = {name for name, param in fresh.denoiser.named_parameters() if not torch.equal(param, before[name])}
    assert changed and all("motion_modules" in name for name in changed)
    assert any(name.endswith("proj_out.weight") for name in changed)
    assert not any(param.requires_grad for param in fresh.denoiser.parameters())


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no testbed motion adapter.*python -m visalign.testbed.video_model"):
        load_testbed_video_model(tmp_path / "nowhere")


@pytest.mark.skipif(not (SHIPPED_VIDEO_MODEL / "config.json").is_file(), reason="no shipped video model")
def test_shipped_video_model_loads_and_its_record_shows_learned_motion():
    record = json.loads((SHIPPED_VIDEO_MODEL / BUILD_RECORD).read_text())
    # The image model frame by frame keeps no object across frames; the trained adapter does.
    assert record["heldout"]["subject_in_every_frame"] > record["heldout_untrained"]["subject_in_every_frame"] + 0.2
    assert record["heldout"]["accuracy"] > record["heldout_untrained"]["accuracy"]
    assert (SHIPPED_VIDEO_MODEL / "diffusion_pytorch_model.safetensors").stat().st_size < 1_000_000
    generator = load_testbed_video_model()
    assert generator.family == "animatediff" and generator.num_frames == 8
    assert generator.pipe.scheduler.config.beta_schedule == "linear"  # the schedule it was trained on
    clip = generator.sample("a red circle moving left", num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0)).images
    assert clip.shape == (1, 8, 3, 32, 32)
