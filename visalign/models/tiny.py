"""Random-init tiny versions of every family, built offline.

They use the same diffusers/transformers classes as the real checkpoints (UNet2DConditionModel,
SD3Transformer2DModel, AutoencoderKL, CLIPTextModel, DDIMScheduler,
FlowMatchEulerDiscreteScheduler), are written with ``save_pretrained`` in the diffusers folder
layout, and are meant to be loaded back through the same ``from_pretrained`` path that real
checkpoints take. Tests, benchmarks and the testbed build on them.

Sizes: 32×32 images, a VAE with a 4× downsampling (8×8×4 latents), text encoders of width 32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_FAMILIES = ("sd", "sd-v", "sdxl", "sd3", "modelscope", "animatediff", "wan")  # the last three: tiny_video.py

_TEXT_WIDTH = 32
SIZES = ("tiny", "testbed", "testbed-wide")
# testbed-wide: a wider denoiser and text encoders (64 wide) on a compact CLIP vocabulary (its
# first merges, 8,192 ids in all), so the shipped folders stay small: the full vocabulary's
# token table and tokenizer file are most of a narrow model's bytes.
_WIDE_TEXT_WIDTH = 64
WIDE_NUM_MERGES = 8192 - 514


def _clip_text_config(projection_dim: int | None = None, vocab_size: int = 49408, width: int = _TEXT_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=projection_dim or width,
        # CLIP's special tokens are the vocabulary's last two ids (the pooled output reads EOS).
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


# SD 1.x/2.x's DDPM noise schedule (also SDXL's and ModelScope T2V's), as their scheduler configs set it.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


# UNet2DConditionModel's ``attention_head_dim`` is, for historical reasons, the *number of heads*
# per block (diffusers refuses ``num_attention_heads`` for this class; SD 1.5's 8 means 8 heads of
# 40 channels). Until session 18 the testbed UNets passed 16 and 32 meaning a head width, which
# gave 16-32 heads of 2-4 channels each: attention that can hardly route by content, and CPU
# attention kernels that made every training and sampling step 3x slower. (2, 4) heads over
# 32/64 channels are 16-wide heads (32-wide in testbed-wide); tests/models/test_loading.py checks.
_TESTBED_HEADS = (2, 4)


def tiny_unet_kwargs(**overrides) -> dict:
    """The tiny UNets' shared layout (2D and 3D): two levels of 32/64 channels at 8x8 latents."""
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
            "layers_per_block": 1, "cross_attention_dim": _TEXT_WIDTH, "attention_head_dim": 8,
            "norm_num_groups": 8, **overrides}


def _tiny_vae(latent_channels: int = 4, flow: bool = False, testbed: bool = False):
    from diffusers import AutoencoderKL

    # tiny: 4x downsampling (32 px -> 8x8 latents). testbed: 2x (32 px -> 16x16), which a small
    # autoencoder learns to reconstruct crisply in a few hundred steps.
    blocks = 2 if testbed else 3
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(32, 64) if testbed else (16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )
    if flow:
        # SD3's VAE has a shift factor and no quant convs.
        kwargs.update(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(**kwargs)


def build_tiny_components(family: str, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None,
                          size: str = "tiny") -> dict:
    """Return the components of a tiny pipeline of ``family`` (one of :data:`TINY_FAMILIES`).

    ``size="tiny"`` (default) is the smallest network that exercises every code path (tests);
    ``size="testbed"`` is wider and deeper, with cross-attention at every resolution, big
    enough to learn the testbed's scenes (the shipped base models).

    ``sd``: SD 1.x layout, epsilon prediction. ``sd-v``: SD 2.x layout, v-prediction.
    ``sdxl``: two text encoders, pooled embeddings and time ids. ``sd3``: MMDiT transformer,
    rectified flow, two CLIP encoders (no T5: ``text_encoder_3=None`` as diffusers allows).
    """
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .tokenizer import build_clip_tokenizer, clip_vocab_size

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")
    from .tiny_video import TINY_VIDEO_FAMILIES, build_tiny_video_components

    if family in TINY_VIDEO_FAMILIES:
        return build_tiny_video_components(family, seed=seed, tokenizer_dir=tokenizer_dir, size=size)
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="visalign-tok-")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    wide = size == "testbed-wide"
    num_merges = WIDE_NUM_MERGES if wide else None
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = None
    if (tokenizer_dir / "vocab.json").exists():
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        if len(tokenizer) != clip_vocab_size(num_merges):  # a folder left by a build of another size
            tokenizer = None
    if tokenizer is None:
        tokenizer = build_clip_tokenizer(tokenizer_dir, num_merges=num_merges)
    text = dict(vocab_size=clip_vocab_size(num_merges), width=_WIDE_TEXT_WIDTH if wide else _TEXT_WIDTH)

    testbed = size in ("testbed", "testbed-wide")
    torch.manual_seed(seed)
    latent_size = 16 if testbed else 8
    if family in ("sd", "sd-v") and wide:
        unet = UNet2DConditionModel(**tiny_unet_kwargs(
            sample_size=latent_size,
            block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_WIDE_TEXT_WIDTH,
            attention_head_dim=_TESTBED_HEADS,  # 32-wide heads over 64/128 channels
            norm_num_groups=32,
            use_linear_projection=family == "sd-v",
        ))
    elif family in ("sd", "sd-v") and testbed:
        unet = UNet2DConditionModel(**tiny_unet_kwargs(
            sample_size=latent_size,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=_TESTBED_HEADS,
            norm_num_groups=16,
            use_linear_projection=family == "sd-v",
        ))
    elif family in ("sd", "sd-v"):
        unet = UNet2DConditionModel(**tiny_unet_kwargs(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            use_linear_projection=family == "sd-v",  # as in SD 2.x
        ))
    if family in ("sd", "sd-v"):
        scheduler = DDIMScheduler(**SD_BETAS, prediction_type="v_prediction" if family == "sd-v" else "epsilon")
        return dict(
            unet=unet,
            vae=_tiny_vae(testbed=testbed),
            text_encoder=CLIPTextModel(_clip_text_config(**text)),
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        time_embed_dim = 8
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT_WIDTH,
            cross_attention_dim=2 * _TEXT_WIDTH,
            norm_num_groups=8,
        )
        scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="leading")
        return dict(
            unet=unet,
            vae=_tiny_vae(),
            # Its widths stay the tiny ones at every size; the vocabulary follows the tokenizer's
            # (the special tokens are its last two ids).
            text_encoder=CLIPTextModel(_clip_text_config(vocab_size=text["vocab_size"])),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(vocab_size=text["vocab_size"])),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            scheduler=scheduler,
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=True,
        )
    # sd3
    layers, head_dim, heads, caption = {"tiny": (2, 16, 2, 32), "testbed": (4, 24, 4, 96), "testbed-wide": (6, 32, 4, 128)}[size]
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * text["width"],  # the two CLIP widths concatenated (T5 absent)
        caption_projection_dim=caption,
        pooled_projection_dim=2 * text["width"],
        pos_embed_max_size=16,
    )
    return dict(
        transformer=transformer,
        vae=_tiny_vae(flow=True, testbed=testbed),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(**text)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(**text)),
        text_encoder_3=None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        image_encoder=None,
        feature_extractor=None,
    )


PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sd-v": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "modelscope": "TextToVideoSDPipeline",
    "animatediff": "AnimateDiffPipeline",
    "wan": "WanPipeline",
}


def build_tiny_pipeline(family: str, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None, size: str = "tiny"):
    """A tiny random-init diffusers pipeline of ``family``."""
    import diffusers

    components = build_tiny_components(family, seed=seed, tokenizer_dir=tokenizer_dir, size=size)
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(family: str, path: str | os.PathLike, seed: int = 0, size: str = "tiny") -> Path:
    """Build a tiny random-init model of ``family`` and write it as a diffusers folder at ``path``.

    The folder loads with ``visalign.models.load_generator(path)`` and with the plain diffusers
    pipeline class (``StableDiffusionPipeline.from_pretrained(path)`` and so on).
    """
    path = Path(path)
    pipe = build_tiny_pipeline(family, seed=seed, tokenizer_dir=path / "tokenizer", size=size)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
