"""Sampling, reference policy, LoRA and saving through the Generator seam."""

import diffusers
import pytest
import torch

from visalign.models import Cond, load_generator

PROMPTS = ["a red circle", "two blue squares"]


def _plain_pipeline(path, generator, **kwargs):
    """The plain diffusers pipeline for ``path``, with the sampler visalign uses (DDIM / flow Euler)."""
    pipeline_class = type(generator.pipe)
    extra = {}
    if not generator.is_flow:
        extra["scheduler"] = diffusers.DDIMScheduler.from_config(generator.scheduler.config)
    else:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    pipe = pipeline_class.from_pretrained(path, **extra, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _perturb(parameters, scale=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("family", ["sd", "sd-v", "sdxl", "sd3"])
def test_sample_matches_the_plain_diffusers_pipeline(tiny_model_dir, family):
    path = tiny_model_dir(family)
    gen = load_generator(path)
    ours = gen.sample(PROMPTS, num_inference_steps=5, guidance_scale=4.0, generator=torch.Generator().manual_seed(7)).images
    pipe = _plain_pipeline(path, gen)
    theirs = pipe(PROMPTS, num_inference_steps=5, guidance_scale=4.0, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_fixed_seed_is_reproducible_and_seeds_differ(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd"))
    first = gen.sample(PROMPTS, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(1)).images
    again = gen.sample(PROMPTS, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(1)).images
    other = gen.sample(PROMPTS, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_guidance_scale_one_skips_the_unconditional_pass(tiny_model_dir, family):
    gen = load_generator(tiny_model_dir(family))
    batch_sizes = []
    handle = gen.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    try:
        gen.sample(PROMPTS, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
        assert batch_sizes == [2, 2, 2]
        batch_sizes.clear()
        gen.sample(PROMPTS, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
        assert batch_sizes == [4, 4, 4]  # one batched call for both branches
    finally:
        handle.remove()


def test_cond_slices_concatenates_and_repeats():
    cond = Cond(prompt_embeds=torch.arange(6.0).reshape(3, 2, 1), pooled_embeds=torch.arange(3.0).reshape(3, 1))
    assert len(cond[1:]) == 2 and cond[2].pooled_embeds.item() == 2.0
    both = Cond.cat([cond[:1], cond[2:]])
    assert both.pooled_embeds.flatten().tolist() == [0.0, 2.0]
    assert cond.repeat_interleave(2).pooled_embeds.flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="pooled_embeds"):
        Cond.cat([cond, Cond(prompt_embeds=torch.zeros(1, 2, 1))])


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_lora_reference_is_the_base_model_and_gets_no_gradient(tiny_model_dir, family):
    path = tiny_model_dir(family)
    base = load_generator(path)
    gen = load_generator(path)
    trainable = gen.add_lora(rank=4)
    assert trainable and all("lora" in name for name, p in gen.denoiser.named_parameters() if p.requires_grad)
    _perturb(trainable)
    cond = gen.encode_prompt(PROMPTS)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5, 0.5]) if gen.is_flow else torch.tensor([500, 500])
    with torch.no_grad():
        expected = base.predict(x_t, t, cond)
    reference_out = gen.reference().predict(x_t, t, cond)
    assert not reference_out.requires_grad
    torch.testing.assert_close(reference_out, expected, atol=1e-5, rtol=1e-5)
    policy_out = gen.predict(x_t, t, cond)
    assert (policy_out - expected).abs().max() > 1e-3
    (policy_out.square().mean() + reference_out.square().mean()).backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in gen.denoiser.parameters() if not p.requires_grad)
    # The round trip through disable/enable adapters leaves the adapters trainable.
    assert all(p.requires_grad for p in trainable)


def test_full_finetuning_reference_is_a_frozen_snapshot(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd"))
    cond = gen.encode_prompt(PROMPTS)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    with torch.no_grad():
        before = gen.predict(x_t, t, cond)
    with pytest.raises(RuntimeError, match="enable_full_finetuning"):
        gen.denoiser.requires_grad_(True)
        gen.reference()
    parameters = gen.enable_full_finetuning()
    assert len(parameters) == len(list(gen.denoiser.parameters()))
    _perturb(parameters, scale=0.05)
    reference = gen.reference()
    torch.testing.assert_close(reference.predict(x_t, t, cond), before, atol=1e-6, rtol=1e-6)
    assert (gen.predict(x_t, t, cond) - before).abs().max() > 1e-3
    assert not any(p.requires_grad for p in gen._reference_module.parameters())


def test_reference_from_a_saved_lora_checkpoint(tiny_model_dir, tmp_path):
    gen = load_generator(tiny_model_dir("sd"))
    trainable = gen.add_lora(rank=4)
    _perturb(trainable, seed=1)
    gen.save_lora(tmp_path / "step-100")
    cond = gen.encode_prompt(PROMPTS)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    with torch.no_grad():
        at_checkpoint = gen.predict(x_t, t, cond)
    _perturb(trainable, seed=2)  # training goes on
    gen.set_reference(tmp_path / "step-100")
    torch.testing.assert_close(gen.reference().predict(x_t, t, cond), at_checkpoint, atol=1e-5, rtol=1e-5)
    assert (gen.predict(x_t, t, cond) - at_checkpoint).abs().max() > 1e-3
    assert all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for n, p in gen.denoiser.named_parameters() if ".reference." in n)
    gen.set_reference(None)  # back to adapters disabled
    base = load_generator(tiny_model_dir("sd"))
    with torch.no_grad():
        torch.testing.assert_close(gen.reference().predict(x_t, t, cond), base.predict(x_t, t, cond), atol=1e-5, rtol=1e-5)


def test_reference_from_a_lora_state_dict_keeps_the_adapters_scale(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd"))
    trainable = gen.add_lora(rank=4, alpha=16)  # scale alpha / rank = 4: loaded at alpha = rank it would be 4x too small
    _perturb(trainable, seed=1, scale=0.2)
    snapshot = {k: v.detach().clone() for k, v in gen.lora_state_dict().items()}
    cond = gen.encode_prompt(PROMPTS)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    with torch.no_grad():
        at_snapshot = gen.predict(x_t, t, cond)
        base = gen.reference().predict(x_t, t, cond)
    assert (at_snapshot - base).abs().max() > 1e-2
    _perturb(trainable, seed=2, scale=0.2)
    gen.set_reference(snapshot)
    torch.testing.assert_close(gen.reference().predict(x_t, t, cond), at_snapshot, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_saved_lora_loads_into_a_plain_pipeline_and_gives_the_same_image(tiny_model_dir, tmp_path, family):
    path = tiny_model_dir(family)
    gen = load_generator(path)
    _perturb(gen.add_lora(rank=4, alpha=8), scale=0.5)
    gen.save_lora(tmp_path / "lora")
    ours = gen.sample(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(3)).images

    pipe = _plain_pipeline(path, gen)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="pt")
    without = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs).images
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs).images
    torch.testing.assert_close(with_lora, ours, atol=1e-4, rtol=1e-4)
    assert (with_lora - without).abs().max() > 1e-3  # the LoRA changes the output


@pytest.mark.parametrize("merge_lora", [False, True])
def test_saved_full_model_loads_into_a_plain_pipeline(tiny_model_dir, tmp_path, merge_lora):
    path = tiny_model_dir("sd")
    gen = load_generator(path)
    if merge_lora:
        _perturb(gen.add_lora(rank=4), scale=0.5)
    else:
        _perturb(gen.enable_full_finetuning(), scale=0.02)
    gen.save_pretrained(tmp_path / "model")
    ours = gen.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(5)).images
    pipe = _plain_pipeline(tmp_path / "model", gen)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(5)).images
    # Merging LoRA into the base weights reorders float sums: allow for that.
    tolerance = 2e-3 if merge_lora else 1e-4
    torch.testing.assert_close(theirs, ours, atol=tolerance, rtol=tolerance)
    original = _plain_pipeline(path, gen)(PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                                          output_type="pt", generator=torch.Generator().manual_seed(5)).images
    assert (theirs - original).abs().max() > 1e-3
    if merge_lora:
        assert gen.has_adapters()  # the live model keeps its adapters


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_gradient_flows_only_through_chosen_steps(tiny_model_dir, family):
    gen = load_generator(tiny_model_dir(family))
    trainable = gen.add_lora(rank=2)
    _perturb(trainable, scale=0.1)
    no_grad = gen.sample(PROMPTS[:1], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert not no_grad.images.requires_grad

    calls = []
    handle = gen.denoiser.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        out = gen.sample(PROMPTS[:1], num_inference_steps=3, guidance_scale=1.0, grad_steps=[2],
                         generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert calls == [False, False, True]
    out.images.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    torch.testing.assert_close(out.images.detach(), gen.sample(PROMPTS[:1], num_inference_steps=3, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(0)).images)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_partial_chain_from_a_trajectory_state_ends_where_the_full_chain_does(tiny_model_dir, family):
    gen = load_generator(tiny_model_dir(family))
    full = gen.sample(PROMPTS, num_inference_steps=6, guidance_scale=3.0, return_trajectory=True,
                      generator=torch.Generator().manual_seed(4))
    seen = []
    partial = gen.sample(PROMPTS, num_inference_steps=6, guidance_scale=3.0, latents=full.trajectory.latents[:, 2],
                         start_step=2, return_trajectory=True, on_step_end=lambda state: seen.append(state.index))
    torch.testing.assert_close(partial.latents, full.latents, atol=1e-5, rtol=1e-5)
    assert seen == [2, 3, 4, 5]  # indices of the full grid
    assert partial.trajectory.latents.shape[1] == 5
    torch.testing.assert_close(partial.trajectory.timesteps, full.trajectory.timesteps[2:])
    with pytest.raises(ValueError, match="pass `latents`"):
        gen.sample(PROMPTS, num_inference_steps=6, start_step=2)
    with pytest.raises(ValueError, match="start_step must lie"):
        gen.sample(PROMPTS, num_inference_steps=6, start_step=6, latents=full.latents)


def test_start_index_is_the_grid_step_nearest_a_noise_level(tiny_model_dir):
    sd = load_generator(tiny_model_dir("sd"))
    timesteps, _ = sd.sampling_timesteps(20)
    assert sd.start_index(20, 0.6) == 7 and int(timesteps[7]) == 601  # InstructVideo's t_tau
    assert sd.start_index(20, 1.0) == 0
    flow = load_generator(tiny_model_dir("sd3"))
    sigmas, _ = flow.sampling_timesteps(10)
    assert flow.start_index(10, 0.6) == int((sigmas - 0.6).abs().argmin())
    assert abs(float(sigmas[flow.start_index(10, 0.6)]) - 0.6) <= 0.05
    with pytest.raises(ValueError, match="strength"):
        sd.start_index(20, 0.0)


def test_step_hooks_can_replace_latents_and_outputs(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd"))
    seen = []

    def on_step_end(state):
        seen.append(state.index)
        return torch.zeros_like(state.latents) if state.index == state.num_steps - 1 else None

    out = gen.sample(PROMPTS, num_inference_steps=3, on_step_end=on_step_end, output_type="latent")
    assert seen == [0, 1, 2] and out.latents.abs().max() == 0
    zero_output = gen.sample(PROMPTS, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                             on_model_output=lambda state: torch.zeros_like(state.model_output),
                             latents=torch.ones(2, 4, 8, 8))
    # eps = 0: DDIM keeps x0 = x_t / a_t, so the latents only grow.
    assert zero_output.latents.min() > 1.0


def test_encode_decode_round_trip_shapes_and_range(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd3"))
    images = torch.rand(2, 3, 32, 32)
    latents = gen.encode(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8)
    decoded = gen.decode(latents)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        gen.encode(torch.rand(3, 32, 32))
    mode_a = gen.encode(images, sample=False)
    torch.testing.assert_close(mode_a, gen.encode(images, sample=False))
