"""Random-init tiny text-to-video models of the video families, built offline.

The same diffusers/transformers classes as the real checkpoints:

- ``modelscope``: ModelScope T2V / zeroscope layout (``TextToVideoSDPipeline``):
  ``UNet3DConditionModel`` (2D spatial blocks plus temporal convolutions and temporal
  attention), the per-frame SD ``AutoencoderKL``, a CLIP text encoder and DDIM. Its spatial
  backbone has the widths and blocks of the tiny ``sd`` UNet, so the two compare per frame.
- ``animatediff``: SD + AnimateDiff layout (``AnimateDiffPipeline``): the tiny ``sd`` UNet
  (``UNet2DConditionModel``) and a tiny ``MotionAdapter`` of the same widths and blocks, which
  the pipeline joins into a ``UNetMotionModel``; the per-frame SD ``AutoencoderKL``, a CLIP text
  encoder and DDIM. :func:`build_tiny_motion_adapter` alone fits the tiny ``sd`` model, the
  real-world recipe (an SD 1.5 model plus a published motion adapter) in small.
- ``wan``: Wan 2.1 layout (``WanPipeline``): ``WanTransformer3DModel`` (a rectified-flow DiT
  over (frame, height, width) patches), the causal 3D ``AutoencoderKLWan`` (4x temporal and 4x
  spatial compression here; 8x spatial in the real one), a ``UMT5EncoderModel`` text encoder
  and ``FlowMatchEulerDiscreteScheduler``. The real Wan ships a T5 tokenizer; the tiny one
  uses the project's offline CLIP BPE tokenizer (the pipeline only calls ``tokenizer(...)``).

Sizes: 32x32 frames; ``modelscope`` any number of frames (8 by default), ``animatediff`` up to
32 (the adapter's ``motion_max_seq_length``; 8 by default), ``wan`` ``4k + 1`` frames (9 by
default: 3 latent frames), the causal VAE's constraint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_VIDEO_FAMILIES = ("modelscope", "animatediff", "wan")

_TEXT_WIDTH = 32


def _tokenizer(tokenizer_dir: str | os.PathLike | None):
    from transformers import CLIPTokenizer

    from .tokenizer import build_clip_tokenizer

    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="visalign-tok-")
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "vocab.json").exists():
        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    return build_clip_tokenizer(tokenizer_dir)


def build_tiny_video_components(family: str, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None,
                                size: str = "tiny") -> dict:
    """The components of a tiny pipeline of a video ``family`` (one of :data:`TINY_VIDEO_FAMILIES`)."""
    if family not in TINY_VIDEO_FAMILIES:
        raise ValueError(f"unknown tiny video family {family!r}; expected one of {TINY_VIDEO_FAMILIES}")
    if size != "tiny":
        raise ValueError(f"video families have only size='tiny' so far, got {size!r}")
    tokenizer = _tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    if family == "modelscope":
        return _modelscope(tokenizer)
    if family == "animatediff":
        return _animatediff(tokenizer)
    return _wan(tokenizer)


def _modelscope(tokenizer) -> dict:
    from diffusers import DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel

    from .tiny import SD_BETAS, _clip_text_config, _tiny_vae, tiny_unet_kwargs

    unet = UNet3DConditionModel(**tiny_unet_kwargs(
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    ))
    # ModelScope T2V's scheduler: SD's scaled-linear betas, epsilon prediction.
    scheduler = DDIMScheduler(**SD_BETAS)
    return dict(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )


def build_tiny_motion_adapter(seed: int | None = None):
    """A random-init ``MotionAdapter`` that fits the tiny ``sd`` UNet (two levels of 32/64
    channels, one layer per block) as ``guoyww/animatediff-motion-adapter-v1-5-2`` fits SD 1.5.
    Its temporal attention runs over at most 32 frames (``motion_max_seq_length``)."""
    from diffusers import MotionAdapter

    from .tiny import tiny_unet_kwargs

    if seed is not None:
        torch.manual_seed(seed)
    unet = tiny_unet_kwargs()
    return MotionAdapter(
        block_out_channels=unet["block_out_channels"],
        motion_layers_per_block=unet["layers_per_block"],
        motion_num_attention_heads=2,
        motion_norm_num_groups=unet["norm_num_groups"],
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )


def _animatediff(tokenizer) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tiny import SD_BETAS, _clip_text_config, _tiny_vae, tiny_unet_kwargs

    # The tiny sd UNet; AnimateDiffPipeline joins it with the adapter into a UNetMotionModel.
    unet = UNet2DConditionModel(**tiny_unet_kwargs(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ))
    return dict(
        unet=unet,
        motion_adapter=build_tiny_motion_adapter(),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=tokenizer,
        # AnimateDiff's published inference schedule: SD's betas on a linear (not scaled) ramp.
        scheduler=DDIMScheduler(**{**SD_BETAS, "beta_schedule": "linear"}),
    )


def _wan(tokenizer) -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    latent_channels = 4
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],  # 2 stages: 4x in space and 4x in time
        latents_mean=[0.0] * latent_channels,
        latents_std=[1.0] * latent_channels,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=_TEXT_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=_TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )
