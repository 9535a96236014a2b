"""The video families (ModelScope T2V UNet, SD + AnimateDiff, Wan flow DiT) behind the Generator seam.

What holds for the image families holds here, on clips ``[B, F, 3, H, W]``: a seed gives the
plain diffusers pipeline's video; the noise-process identities; stored stochastic transitions
re-evaluate to their sampling log-probability; gradient reaches the decoded frames only through
the chosen steps; the LoRA reference is the base model. Plus what is video's own: the frame
count, chunked VAE decoding, Wan's scheduler and frame-count rules, and AnimateDiff's ways in
(a saved pipeline; an SD folder or single-file checkpoint plus a motion adapter).
"""

import json
import math

import diffusers
import pytest
import torch

from visalign.models import (
    AnimateDiffGenerator,
    ModelLoadError,
    ModelScopeGenerator,
    WanGenerator,
    describe_model,
    load_generator,
)

FAMILIES = ["modelscope", "animatediff", "wan"]
FRAMES = {"modelscope": 8, "animatediff": 8, "wan": 9}
PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    return {
        family: load_generator(tiny_model_dir(family), num_frames=FRAMES[family], height=32, width=32)
        for family in FAMILIES
    }


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _perturb(parameters, scale, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn_like(p))


def test_families_are_detected_and_described(tiny_model_dir, generators):
    assert isinstance(generators["modelscope"], ModelScopeGenerator) and not generators["modelscope"].is_flow
    assert isinstance(generators["wan"], WanGenerator) and generators["wan"].is_flow
    assert isinstance(generators["animatediff"], AnimateDiffGenerator) and not generators["animatediff"].is_flow
    assert all(gen.is_video for gen in generators.values())
    info = describe_model(tiny_model_dir("wan"))
    assert info["family"] == "wan" and info["video"] and info["prediction_type"] == "flow"
    assert info["vae_scale_factor"] == 4 and info["vae_temporal_scale_factor"] == 4 and info["resolution"] is None
    info = describe_model(tiny_model_dir("modelscope"))
    assert info["denoiser"] == "UNet3DConditionModel" and info["resolution"] == 32 and info["video"]
    info = describe_model(tiny_model_dir("animatediff"))
    assert info["family"] == "animatediff" and info["denoiser"] == "UNetMotionModel" and info["resolution"] == 32
    assert info["video"] and info["prediction_type"] == "epsilon"


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_matches_the_plain_diffusers_pipeline(tiny_model_dir, generators, family):
    gen = generators[family]
    ours = gen.sample(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(7))
    assert ours.images.shape == (2, FRAMES[family], 3, 32, 32)
    assert ours.latents.shape == gen.latent_shape(2)
    extra = {} if gen.is_flow else {"scheduler": diffusers.DDIMScheduler.from_config(gen.scheduler.config)}
    pipe = type(gen.pipe).from_pretrained(tiny_model_dir(family), **extra)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=32, width=32, num_frames=FRAMES[family],
                  output_type="pt", generator=torch.Generator().manual_seed(7)).frames
    torch.testing.assert_close(ours.images, theirs, atol=1e-4, rtol=1e-4)


def test_latent_layout_and_frame_counts(generators):
    scope, wan, animatediff = generators["modelscope"], generators["wan"], generators["animatediff"]
    assert scope.latent_shape(2) == (2, 4, 8, 8, 8)  # [B, C, F, h, w]
    assert animatediff.latent_shape(1, num_frames=32) == (1, 4, 32, 8, 8)
    with pytest.raises(ValueError, match="at most 32 frames"):  # the motion modules' position table
        animatediff.latent_shape(1, num_frames=33)
    assert scope.latent_shape(1, num_frames=5) == (1, 4, 5, 8, 8)
    assert wan.latent_shape(2) == (2, 4, 3, 8, 8)  # 9 frames -> (9 - 1) / 4 + 1 latent frames
    assert wan.latent_shape(1, num_frames=5) == (1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        wan.latent_shape(1, num_frames=8)
    with pytest.raises(ValueError, match="multiples of 8"):
        wan.latent_shape(1, height=36, width=32)  # VAE factor 4 times the DiT's 2x2 patches
    out = scope.sample(PROMPTS[:1], num_frames=3, num_inference_steps=1, guidance_scale=1.0)
    assert out.images.shape == (1, 3, 3, 32, 32) and scope.num_frames == 8  # the default is restored
    clips = wan.sample(PROMPTS[:1], num_frames=5, num_inference_steps=1, guidance_scale=1.0, output_type="pil").images
    assert len(clips) == 1 and len(clips[0]) == 5 and clips[0][0].size == (32, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_target_recovers_x0_and_noise(generators, family):
    gen = generators[family]
    shape = gen.latent_shape(3)
    x0, noise = _random(shape, 0), _random(shape, 1)
    t = gen.sample_timesteps(3, generator=torch.Generator().manual_seed(2))
    x_t = gen.add_noise(x0, noise, t)
    target = gen.target(x0, noise, t)
    torch.testing.assert_close(gen.predict_x0(x_t, t, target), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(gen.predict_noise(x_t, t, target), noise, atol=2e-4, rtol=1e-4)
    if gen.is_flow:  # x_s = (1 - s) x0 + s eps, v = eps - x0, and VideoAlign's Lemma
        s = t.reshape(-1, 1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
        torch.testing.assert_close(target, noise - x0)
        v_hat = _random(shape, 3)
        lhs = ((noise - gen.predict_noise(x_t, t, v_hat)) ** 2).flatten(1).mean(1)
        rhs = (1 - t) ** 2 * ((target - v_hat) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-4)
    else:  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, target eps
        abar = gen.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
        torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
        torch.testing.assert_close(target, noise)


@pytest.mark.parametrize("family", FAMILIES)
def test_stochastic_step_log_prob_is_the_mean_gaussian_log_density(generators, family):
    gen = generators[family]
    timesteps, next_timesteps = gen.sampling_timesteps(4)
    shape = gen.latent_shape(2)
    x_t, out = _random(shape, 0), _random(shape, 1)
    result = gen.step(x_t, timesteps[1], next_timesteps[1], out, eta=0.7, generator=torch.Generator().manual_seed(0))
    z = (result.prev_sample - result.mean) / result.std
    expected = (-(z**2) / 2 - torch.log(result.std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(result.log_prob, expected, atol=1e-5, rtol=1e-5)
    assert result.log_prob.shape == (2,) and result.log_prob.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_transitions_reevaluate_to_the_sampling_log_prob(generators, family):
    gen = generators[family]
    eta = 0.7 if gen.is_flow else 1.0
    out = gen.sample(PROMPTS, num_inference_steps=3, guidance_scale=3.0, eta=eta, return_trajectory=True,
                     output_type="latent", generator=torch.Generator().manual_seed(0))
    trajectory = out.trajectory
    assert trajectory.log_probs.shape == (2, 3) and trajectory.latents.shape == (2, 4, *gen.latent_shape(2)[1:])
    with torch.no_grad():
        for index in range(3):
            again = gen.step_log_prob(trajectory.latents[:, index], trajectory.timesteps[index],
                                      trajectory.next_timesteps[index], trajectory.latents[:, index + 1], out.cond,
                                      eta=eta, guidance_scale=3.0)
            torch.testing.assert_close(again.log_prob, trajectory.log_probs[:, index], atol=1e-4, rtol=1e-5)
    saved = {k: v.clone() for k, v in gen.denoiser.state_dict().items()}
    try:
        _perturb(gen.denoiser.parameters(), 0.05)
        with torch.no_grad():
            moved = gen.step_log_prob(trajectory.latents[:, 1], trajectory.timesteps[1], trajectory.next_timesteps[1],
                                      trajectory.latents[:, 2], out.cond, eta=eta, guidance_scale=3.0)
    finally:
        gen.denoiser.load_state_dict(saved)
    assert not torch.allclose(moved.log_prob, trajectory.log_probs[:, 1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_reference_and_gradient_through_chosen_steps(tiny_model_dir, family):
    gen = load_generator(tiny_model_dir(family), num_frames=FRAMES[family], height=32, width=32)
    cond = gen.encode_prompt(PROMPTS[:1])
    x_t = _random(gen.latent_shape(1), 0)
    t = torch.tensor([0.5]) if gen.is_flow else torch.tensor([500])
    with torch.no_grad():
        base = gen.predict(x_t, t, cond)
    trainable = gen.add_lora(rank=2)
    _perturb(trainable, 0.3)
    torch.testing.assert_close(gen.reference().predict(x_t, t, cond), base, atol=1e-5, rtol=1e-5)
    assert (gen.predict(x_t, t, cond) - base).abs().max() > 1e-4

    calls = []
    handle = gen.denoiser.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        out = gen.sample(cond=cond, num_inference_steps=3, guidance_scale=1.0, grad_steps=[2],
                         generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert calls == [False, False, True]
    assert out.images.shape == (1, FRAMES[family], 3, 32, 32) and out.images.requires_grad
    out.images[:, -1].mean().backward()  # the last frame alone reaches the weights
    assert all(p.grad is not None for p in trainable) and sum(p.grad.abs().sum() for p in trainable) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_back_and_into_the_plain_pipeline(tiny_model_dir, generators, tmp_path, family):
    gen = load_generator(tiny_model_dir(family), num_frames=FRAMES[family], height=32, width=32)
    _perturb(gen.add_lora(rank=4, alpha=8), 0.5)
    gen.save_lora(tmp_path / "lora")
    ours = gen.sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    if family != "modelscope":
        pipe = type(gen.pipe).from_pretrained(tiny_model_dir(family))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(tmp_path / "lora")
        theirs = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                      num_frames=FRAMES[family], output_type="pt", generator=torch.Generator().manual_seed(3)).frames
    else:  # diffusers' UNet3DConditionModel takes no LoRA; a fresh generator does
        fresh = load_generator(tiny_model_dir(family), num_frames=FRAMES[family], height=32, width=32)
        fresh.load_lora(tmp_path / "lora")
        theirs = fresh.sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0,
                              generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(theirs, ours.images, atol=1e-4, rtol=1e-4)
    base = generators[family].sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0,
                                     generator=torch.Generator().manual_seed(3)).images
    assert (base - ours.images).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_in_frame_chunks_is_the_same_video(generators, family):
    gen = generators[family]
    latents = _random(gen.latent_shape(2), 0)
    whole = gen.decode(latents)
    batches = []
    handle = gen.vae.decoder.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        gen.decode_chunk_size = 3
        chunked = gen.decode(latents)
    finally:
        gen.decode_chunk_size = None
        handle.remove()
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    if family != "wan":  # 16 frames, 3 per decoder call
        assert batches == [3, 3, 3, 3, 3, 1]
    else:  # the causal VAE decodes whole clips latent frame by latent frame: one clip per call
        assert len(batches) == 2 * 3 and set(batches) == {1}
    videos = torch.rand(2, FRAMES[family], 3, 32, 32)
    encoded = gen.encode(videos, sample=False)
    assert encoded.shape == gen.latent_shape(2)
    assert gen.decode(encoded).shape == videos.shape
    with pytest.raises(ValueError, match="\\[B, F, 3, H, W\\]"):
        gen.encode(videos[:, 0])


@pytest.mark.parametrize("family", ["modelscope", "animatediff"])
def test_gradient_checkpointing_recomputes_the_unet_and_keeps_the_gradients(tiny_model_dir, family):
    gen = load_generator(tiny_model_dir(family), num_frames=4, height=32, width=32)
    trainable = gen.add_lora(rank=2)
    _perturb(trainable, 0.3)
    cond = gen.encode_prompt(PROMPTS[:1])
    x_t, t = _random(gen.latent_shape(1), 0), torch.tensor([400])

    def gradients():
        for p in trainable:
            p.grad = None
        gen.predict(x_t, t, cond).square().mean().backward()
        return [p.grad.clone() for p in trainable]

    plain = gradients()
    # ModelScope's UNet3DConditionModel has no block-level checkpointing: the generator
    # checkpoints the whole UNet call. UNetMotionModel has diffusers' own, per block.
    recomputed = gen.denoiser if family == "modelscope" else gen.denoiser.up_blocks[-1].resnets[0]
    calls = []
    handle = recomputed.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        gen.enable_gradient_checkpointing(vae=False)
        checkpointed = gradients()
    finally:
        handle.remove()
    assert len(calls) == 2  # forward, and again (recomputed) in backward
    assert gen.denoiser.is_gradient_checkpointing == (family == "animatediff")
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _motion_state(module) -> dict:
    return {k: v for k, v in module.state_dict().items() if "motion_modules" in k}


@pytest.fixture(scope="module")
def motion_adapter_dir(tmp_path_factory):
    """A tiny motion adapter folder that fits the tiny sd model (the SD 1.5 + adapter recipe in small)."""
    from visalign.models.tiny_video import build_tiny_motion_adapter

    path = tmp_path_factory.mktemp("motion-adapter")
    build_tiny_motion_adapter(seed=1).save_pretrained(path)
    return path


def test_animatediff_from_an_sd_model_and_a_motion_adapter(tiny_model_dir, motion_adapter_dir, tmp_path):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    sd = tiny_model_dir("sd")
    gen = load_generator(sd, motion_adapter=motion_adapter_dir, num_frames=8, height=32, width=32)
    adapter = MotionAdapter.from_pretrained(motion_adapter_dir)
    sd_unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    assert isinstance(gen, AnimateDiffGenerator) and gen.pipe.motion_adapter is None  # no second copy
    # The motion modules are the adapter's, every other weight is the SD UNet's.
    ours, theirs = _motion_state(gen.denoiser), _motion_state(adapter)
    assert len(theirs) > 0 and {k.replace(".motion_modules.", ".") for k in ours} == {
        k.replace(".motion_modules.", ".") for k in theirs}
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    torch.testing.assert_close(gen.denoiser.down_blocks[0].attentions[0].proj_in.weight,
                               sd_unet.down_blocks[0].attentions[0].proj_in.weight, atol=0, rtol=0)
    # AnimateDiff's schedule (linear betas), the SD model's beta range.
    assert gen.scheduler.config.beta_schedule == "linear" and gen.scheduler.config.beta_end == 0.012
    # The temporal layers mix frames: changing frame 0 changes the prediction at frame 5.
    cond = gen.encode_prompt(PROMPTS[:1])
    x_t = _random(gen.latent_shape(1), 0)
    moved = x_t.clone()
    moved[:, :, 0] += 1.0
    with torch.no_grad():
        assert (gen.predict(moved, 500, cond) - gen.predict(x_t, 500, cond))[:, :, 5].abs().max() > 1e-4

    video = gen.sample(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(5)).images
    scheduler = DDIMScheduler.from_pretrained(sd, subfolder="scheduler", beta_schedule="linear")
    pipe = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=adapter, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=32, width=32, num_frames=8,
                 output_type="pt", generator=torch.Generator().manual_seed(5)).frames
    torch.testing.assert_close(video, plain, atol=1e-4, rtol=1e-4)
    gen.denoiser.save_motion_modules(tmp_path / "motion")  # the motion modules, as an adapter again
    written = _motion_state(MotionAdapter.from_pretrained(tmp_path / "motion"))
    assert written.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in written.items())

    # Saved with a merged LoRA: one folder, motion modules in unet/, read back by us and by diffusers.
    _perturb(gen.add_lora(rank=2), 0.3)
    tuned = gen.sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(6)).images
    assert (tuned - gen.reference().sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0,
                                           generator=torch.Generator().manual_seed(6)).images).abs().max() > 1e-3
    folder = gen.save_pretrained(tmp_path / "saved")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline" and index["unet"][1] == "UNetMotionModel"
    assert index["motion_adapter"] == [None, None] and not (folder / "motion_adapter").exists()
    again = load_generator(folder, num_frames=8, height=32, width=32)
    assert isinstance(again, AnimateDiffGenerator) and not again.has_adapters()
    reloaded = again.sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(6)).images
    torch.testing.assert_close(reloaded, tuned, atol=1e-4, rtol=1e-4)
    pipe = AnimateDiffPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, height=32, width=32, num_frames=8,
                 output_type="pt", generator=torch.Generator().manual_seed(6)).frames
    torch.testing.assert_close(plain, tuned, atol=1e-4, rtol=1e-4)


def test_animatediff_refuses_a_missing_or_incompatible_motion_adapter(tiny_model_dir, motion_adapter_dir):
    from diffusers import MotionAdapter

    sd = tiny_model_dir("sd")
    with pytest.raises(ModelLoadError, match="has no motion modules.*motion_adapter="):
        load_generator(sd, family="animatediff")
    with pytest.raises(ModelLoadError, match="has no motion modules"):
        AnimateDiffGenerator.from_pretrained(sd)
    with pytest.raises(ModelLoadError, match="cannot read the motion adapter"):
        load_generator(sd, motion_adapter=motion_adapter_dir / "missing")
    with pytest.raises(ModelLoadError, match="pipeline folder, not a motion adapter"):
        load_generator(sd, motion_adapter=tiny_model_dir("animatediff"))
    with pytest.raises(ModelLoadError, match="'UNet2DConditionModel', not a MotionAdapter"):
        load_generator(sd, motion_adapter=sd / "unet")
    with pytest.raises(ModelLoadError, match="already holds its motion modules"):
        load_generator(tiny_model_dir("animatediff"), motion_adapter=motion_adapter_dir)
    with pytest.raises(ModelLoadError, match="belongs to family='animatediff'"):
        load_generator(sd, family="sd", motion_adapter=motion_adapter_dir)
    with pytest.raises(ModelLoadError, match="holds a 'sdxl' model, not 'animatediff'"):
        load_generator(tiny_model_dir("sdxl"), motion_adapter=motion_adapter_dir)
    deeper = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
                           motion_norm_num_groups=8)
    with pytest.raises(ModelLoadError, match="layers per block are \\(2, 2\\), the UNet's \\(1, 1\\)"):
        load_generator(sd, motion_adapter=deeper)
    narrower = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                             motion_norm_num_groups=8)
    with pytest.raises(ModelLoadError, match="block_out_channels are \\(16, 32\\), the UNet's \\(32, 64\\)"):
        load_generator(sd, motion_adapter=narrower)


def test_animatediff_from_a_single_file_sd_checkpoint_is_the_folder_path(tiny_model_dir, motion_adapter_dir,
                                                                          sd_single_file):
    from diffusers import DDIMScheduler

    path, config = sd_single_file
    size = {"num_frames": 8, "height": 32, "width": 32}
    gen = load_generator(path, motion_adapter=motion_adapter_dir, config=config, **size)
    from_folder = load_generator(tiny_model_dir("sd"), motion_adapter=motion_adapter_dir, **size)
    assert isinstance(gen, AnimateDiffGenerator) and gen.family == "animatediff" and gen.pipe.motion_adapter is None
    assert type(gen.denoiser).__name__ == "UNetMotionModel" and gen.num_frames == 8
    # AnimateDiff's schedule: DDIM, linear betas over the SD model's beta range, no clipping.
    assert isinstance(gen.scheduler, DDIMScheduler) and dict(gen.scheduler.config) == dict(from_folder.scheduler.config)
    assert gen.scheduler.config.beta_schedule == "linear" and gen.scheduler.config.beta_end == 0.012
    assert not gen.scheduler.config.clip_sample
    ours, theirs = gen.denoiser.state_dict(), from_folder.denoiser.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    sample = dict(num_inference_steps=2, guidance_scale=4.0)
    video = gen.sample(PROMPTS[:1], generator=torch.Generator().manual_seed(3), **sample).images
    expected = from_folder.sample(PROMPTS[:1], generator=torch.Generator().manual_seed(3), **sample).images
    assert video.shape == (1, 8, 3, 32, 32)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)

    # A scheduler passed in is kept, as for a folder.
    own = DDIMScheduler.from_pretrained(config, subfolder="scheduler")
    kept = AnimateDiffGenerator.from_single_file(path, motion_adapter=motion_adapter_dir, config=config, scheduler=own)
    assert kept.scheduler is own and kept.scheduler.config.beta_schedule != "linear"


def test_animatediff_from_a_single_file_refuses_a_missing_or_unfit_adapter(tiny_model_dir, motion_adapter_dir,
                                                                          sd_single_file, tmp_path):
    from diffusers import MotionAdapter

    from visalign.models.export import export_single_file

    path, config = sd_single_file
    for load in (lambda: load_generator(path, family="animatediff", config=config),
                 lambda: AnimateDiffGenerator.from_single_file(path, config=config)):
        with pytest.raises(ModelLoadError, match="single-file SD checkpoint, which has no motion modules.*"
                                                 "motion_adapter=<a MotionAdapter folder or hub id"):
            load()
    narrower = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                             motion_norm_num_groups=8)
    with pytest.raises(ModelLoadError, match="does not fit the UNet of .*block_out_channels are \\(16, 32\\), "
                                             "the UNet's \\(32, 64\\)"):
        load_generator(path, motion_adapter=narrower, config=config)
    with pytest.raises(ModelLoadError, match="cannot read the motion adapter"):
        load_generator(path, motion_adapter=motion_adapter_dir / "missing", config=config)
    sdxl = export_single_file(tiny_model_dir("sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelLoadError, match="holds a 'sdxl' checkpoint; AnimateDiff joins a motion adapter to an SD"):
        load_generator(sdxl, motion_adapter=motion_adapter_dir)


def test_wan_samples_on_a_flow_euler_grid_whatever_scheduler_it_ships(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "wan-unipc"
    shutil.copytree(tiny_model_dir("wan"), folder)
    unipc = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    gen = load_generator(folder, num_frames=5, height=32, width=32)
    assert isinstance(gen.pipe.scheduler, diffusers.UniPCMultistepScheduler)
    timesteps, next_timesteps = gen.sampling_timesteps(4)
    grid = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid.set_timesteps(4)
    torch.testing.assert_close(timesteps, grid.sigmas[:-1])
    torch.testing.assert_close(next_timesteps, grid.sigmas[1:])
    assert gen.sample(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0).images.shape == (1, 5, 3, 32, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_visalign_sample_writes_clips_and_a_frame_grid(tiny_model_dir, tmp_path, family):
    import imageio.v3 as iio
    from click.testing import CliRunner
    from PIL import Image

    from visalign.cli import main

    out = tmp_path / "out"
    frames = {"modelscope": 4, "animatediff": 4, "wan": 5}[family]
    result = CliRunner().invoke(main, [
        "sample", f"model={tiny_model_dir(family)}", "prompts=[a red circle moving left, a blue square moving up]",
        "steps=2", "num_images_per_prompt=1", f"num_frames={frames}", "height=32", "width=32", "video_format=both",
        "fps=4", f"out={out}",
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["000-a-red-circle-moving-left-0.mp4", "001-a-blue-square-moving-up-0.mp4"]
    mp4 = iio.imread(out / records[0]["file"])
    assert mp4.shape == (frames, 32, 32, 3)
    gif = Image.open(out / records[1]["file"].replace(".mp4", ".gif"))
    assert gif.n_frames == frames and gif.size == (32, 32)
    assert (out / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_training_losses_take_video_latents_unchanged(generators, family):
    from visalign.algorithms.common import denoising_loss, paired_noising

    gen = generators[family]
    videos = torch.rand(2, FRAMES[family], 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = gen.encode(videos, generator=torch.Generator().manual_seed(1))
        cond = gen.encode_prompt(PROMPTS)
        loss = denoising_loss(gen, latents, cond, rng=torch.Generator().manual_seed(2))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    x_t, noise, t, target = paired_noising(gen, latents, group_size=2, rng=torch.Generator().manual_seed(3))
    assert torch.equal(noise[0], noise[1]) and torch.equal(t[0], t[1]) and x_t.shape == latents.shape


def test_wan_gradient_checkpointing_leaves_its_vae_alone(tiny_model_dir):
    gen = load_generator(tiny_model_dir("wan"), num_frames=5, height=32, width=32)
    gen.enable_gradient_checkpointing()  # AutoencoderKLWan has none: no error, the DiT's blocks only
    assert gen.denoiser.gradient_checkpointing and not getattr(gen.vae, "gradient_checkpointing", False)


def test_visalign_sample_takes_an_sd_model_and_a_motion_adapter(tiny_model_dir, motion_adapter_dir, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from visalign.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "sample", f"model={tiny_model_dir('sd')}", f"motion_adapter={motion_adapter_dir}", "prompts=[a red circle moving left]",
        "steps=2", "num_images_per_prompt=1", "num_frames=3", "height=32", "width=32", "video_format=gif", f"out={out}",
    ])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert Image.open(out / record["file"]).n_frames == 3
    result = CliRunner().invoke(main, ["sample", f"model={tiny_model_dir('sd')}", "family=animatediff", "prompts=[x]",
                                       f"out={tmp_path / 'none'}"])
    assert result.exit_code != 0 and "motion_adapter=" in result.output


def test_animatediff_docs_example_runs_and_prints_what_it_says(capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "video.md"
    text = doc.read_text()
    section = text[text.index("## SD + AnimateDiff"):text.index("## Sampling from the command line")]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[1:3]
    exec(compile(code, str(doc), "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out == printed
