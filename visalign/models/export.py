"""Export a model to one original-layout ``.safetensors`` file ("A1111 / ComfyUI" checkpoints).

The file holds the denoiser, the VAE and the text encoders under the key names of the
original CompVis / Stability code, which AUTOMATIC1111, ComfyUI, Forge and diffusers'
``from_single_file`` read:

| family | denoiser | VAE | text encoders |
| --- | --- | --- | --- |
| SD 1.x | ``model.diffusion_model.`` (LDM UNet) | ``first_stage_model.`` | ``cond_stage_model.transformer.`` (HF CLIP) |
| SD 2.x | same | same | ``cond_stage_model.model.`` (OpenCLIP) |
| SDXL | same | same | ``conditioner.embedders.0.transformer.`` (HF CLIP), ``conditioner.embedders.1.model.`` (OpenCLIP) |
| SD3 | ``model.diffusion_model.`` (MMDiT) | same | ``text_encoders.clip_l.transformer.``, ``...clip_g.transformer.``, ``...t5xxl.transformer.`` |

Each mapping below is the inverse of the matching converter in diffusers'
``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_open_clip_checkpoint``, ``convert_sd3_transformer_checkpoint_to_diffusers``). A key
that no rule maps is an error, so an architecture the original layout cannot hold is refused
instead of silently dropping weights.

>>> from visalign.models.export import export_single_file
>>> export_single_file("runs/sft/model", "my-model.safetensors", dtype="fp16")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class ExportError(ValueError):
    """The model cannot be written in the original single-file layout (the message says why)."""


# ------------------------------------------------------------------------------------------------
# LoRA: merged weights without a second copy of the network


def merged_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with its active peft LoRA adapters merged into the base weights.

    The result has the plain (adapter-free) key names. The merge is ``W + B A * scaling`` per
    layer, what ``fuse_lora`` computes, but done per tensor so a large denoiser is not copied.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas: dict[str, Tensor] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, BaseTunerLayer) or layer.disable_adapters:
            continue
        for adapter in layer.active_adapters:
            if adapter in layer.merged_adapters:  # already inside the base weight
                continue
            if getattr(layer, "use_dora", {}).get(adapter):
                raise ExportError(f"{name}: DoRA adapters are not merged by export; save_pretrained() the model first")
            delta = layer.get_delta_weight(adapter)
            key = f"{name}.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    state = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = value + deltas.pop(key).to(value.dtype) if key in deltas else value
    if deltas:
        raise ExportError(f"LoRA deltas without a base weight: {sorted(deltas)[:3]}")
    return state


# ------------------------------------------------------------------------------------------------
# UNet (SD 1.x / 2.x / SDXL): diffusers blocks -> LDM input_blocks / middle_block / output_blocks

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + size embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_to_original(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """Diffusers ``UNet2DConditionModel`` keys → LDM ``openaimodel.UNetModel`` keys (no prefix).

    In the LDM UNet, down block ``b`` layer ``j`` is ``input_blocks[1 + b (L + 1) + j]`` (``.0``
    the resnet, ``.1`` the transformer) and its downsampler ``input_blocks[1 + b (L + 1) + L].0.op``;
    up block ``b`` layer ``j`` is ``output_blocks[b (L + 1) + j]`` with the upsampler after the
    transformer (``.2.conv``, or ``.1.conv`` in a block without attention). ``L`` is
    ``layers_per_block``.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ExportError(f"layers_per_block={layers!r}: the LDM layout needs one int for every block")
    up_has_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        if head not in _UNET_RESNET:
            raise KeyError(rest)
        return f"{_UNET_RESNET[head]}.{tail}"

    def convert(key: str) -> str:
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP_LEVEL:
            return f"{_UNET_TOP_LEVEL[module]}.{param}"
        if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            layer = 1 + block * (layers + 1) + index
            return f"input_blocks.{layer}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{layer}.1.{rest}"
        if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            return f"input_blocks.{1 + int(match[1]) * (layers + 1) + layers}.0.op.{match[2]}"
        if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, index, rest = match[1], int(match[2]), match[3]
            # middle_block alternates resnet, transformer, resnet, ...
            return f"middle_block.{2 * index}.{resnet(rest)}" if kind == "resnets" else f"middle_block.{2 * index + 1}.{rest}"
        if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            layer = block * (layers + 1) + index
            return f"output_blocks.{layer}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{layer}.1.{rest}"
        if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            block = int(match[1])
            slot = 2 if block in up_has_attention else 1
            return f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{match[2]}"
        raise KeyError(key)

    return _rename(state, convert, "UNet")


# ------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL -> LDM AutoencoderKL


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` keys → LDM ``AutoencoderKL`` keys (no prefix).

    The LDM decoder numbers its up blocks from the lowest resolution (``up.{n-1}`` is the first
    one run), and its mid-block attention projections are 1×1 convolutions, so their weights
    get two trailing unit dimensions.
    """
    num_up = len(config["up_block_types"])

    def convert(key: str) -> str:
        if match := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(\w+)", key):
            name = "norm_out" if match[2] == "conv_norm_out" else match[2]
            return f"{match[1]}.{name}.{match[3]}"
        if re.fullmatch(r"(post_)?quant_conv\.\w+", key):
            return key
        if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            return f"encoder.down.{match[1]}.block.{match[2]}.{_VAE_RESNET.get(match[3], match[3])}.{match[4]}"
        if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
        if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            block = num_up - 1 - int(match[1])
            return f"decoder.up.{block}.block.{match[2]}.{_VAE_RESNET.get(match[3], match[3])}.{match[4]}"
        if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            return f"decoder.up.{num_up - 1 - int(match[1])}.upsample.conv.{match[2]}"
        if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_VAE_RESNET.get(match[3], match[3])}.{match[4]}"
        if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key):
            return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION[match[2]]}.{match[3]}"
        raise KeyError(key)

    converted = _rename(state, convert, "VAE")
    for key, value in converted.items():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.dim() == 2:
            converted[key] = value[:, :, None, None]
    return converted


# ------------------------------------------------------------------------------------------------
# Text encoders: transformers CLIP -> HF-layout keys or OpenCLIP keys


def clip_to_transformers_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text-model keys as the original checkpoints store them: ``text_model.…`` (and a
    top-level ``text_projection.weight``). Recent transformers drop the ``text_model.`` level
    of ``CLIPTextModel``; the file keeps it so every reader finds the keys it expects."""
    return {
        key if key.startswith("text_model.") or key == "text_projection.weight" else f"text_model.{key}": value
        for key, value in state.items()
    }


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIP text-model keys → OpenCLIP ``TextTransformer`` keys (no prefix).

    OpenCLIP fuses q, k, v into ``attn.in_proj_weight`` / ``in_proj_bias`` and stores the text
    projection transposed (``x @ text_projection``).
    """
    state = {k.removeprefix("text_model."): v for k, v in clip_to_transformers_layout(state).items()}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{match[1]}.attn.in_proj_{match[3]}", {})[match[2]] = value
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if match[2] not in _OPEN_CLIP_LAYER:
                raise ExportError(f"text encoder: no OpenCLIP name for {key!r}")
            out[f"transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[match[2]]}.{match[3]}"] = value
        elif key == "embeddings.position_ids":
            continue  # a buffer, not a weight
        else:
            raise ExportError(f"text encoder: no OpenCLIP name for {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ------------------------------------------------------------------------------------------------
# SD3 MMDiT: diffusers SD3Transformer2DModel -> the reference MMDiT


def _swap_scale_shift(weight: Tensor) -> Tensor:
    # diffusers orders the final adaLN output (scale, shift); the reference MMDiT (shift, scale).
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_SD3_TOP_LEVEL = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias",
    "time_text_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_text_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_text_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_text_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "time_text_embed.text_embedder.linear_1.weight": "y_embedder.mlp.0.weight",
    "time_text_embed.text_embedder.linear_1.bias": "y_embedder.mlp.0.bias",
    "time_text_embed.text_embedder.linear_2.weight": "y_embedder.mlp.2.weight",
    "time_text_embed.text_embedder.linear_2.bias": "y_embedder.mlp.2.bias",
    "context_embedder.weight": "context_embedder.weight",
    "context_embedder.bias": "context_embedder.bias",
    "proj_out.weight": "final_layer.linear.weight",
    "proj_out.bias": "final_layer.linear.bias",
}

_SD3_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}

_SD3_QKV = {
    "attn.to_": "x_block.attn.qkv",
    "attn.add_": "context_block.attn.qkv",  # add_q_proj, add_k_proj, add_v_proj
    "attn2.to_": "x_block.attn2.qkv",
}


def sd3_transformer_to_original(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """Diffusers ``SD3Transformer2DModel`` keys → the reference MMDiT's ``joint_blocks`` keys."""
    last = config["num_layers"] - 1
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in _SD3_TOP_LEVEL:
            out[_SD3_TOP_LEVEL[key]] = value
        elif key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rpartition(".")[2]] = _swap_scale_shift(value)
        elif match := re.fullmatch(r"transformer_blocks\.(\d+)\.(attn2?)\.(to_|add_)(q|k|v)(?:_proj)?\.(weight|bias)", key):
            block, attention, kind, part, param = match.groups()
            qkv = _SD3_QKV.get(f"{attention}.{kind}")
            if qkv is None:
                raise ExportError(f"SD3 transformer: no MMDiT name for {key!r}")
            fused.setdefault(f"joint_blocks.{block}.{qkv}.{param}", {})[part] = value
        elif match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key):
            block, module, param = int(match[1]), match[2], match[3]
            if module not in _SD3_BLOCK:
                raise ExportError(f"SD3 transformer: no MMDiT name for {key!r}")
            if module == "norm1_context.linear" and block == last:
                value = _swap_scale_shift(value)  # the last context block is adaLN-only (pre_only)
            out[f"joint_blocks.{block}.{_SD3_BLOCK[module]}.{param}"] = value
        else:
            raise ExportError(f"SD3 transformer: no MMDiT name for {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ------------------------------------------------------------------------------------------------
# The whole file


def _rename(state: dict[str, Tensor], convert, what: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        try:
            new_key = convert(key)
        except KeyError:
            raise ExportError(
                f"{what}: no original-layout name for {key!r} (an architecture the original layout cannot hold)"
            ) from None
        if new_key in out:
            raise ExportError(f"{what}: {key!r} and another key both map to {new_key!r}")
        out[new_key] = value
    return out


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in state.items()}


def uses_open_clip(generator) -> bool:
    """SD 2.x (OpenCLIP text encoder) rather than SD 1.x (OpenAI CLIP): SD 2.x is the SD layout
    with linear transformer projections, which its checkpoints pair with OpenCLIP keys."""
    return bool(generator.denoiser.config.get("use_linear_projection", False))


def original_state_dict(generator) -> dict[str, Tensor]:
    """All of ``generator``'s weights under original-layout keys, LoRA adapters merged."""
    family = generator.family
    pipe = generator.pipe
    denoiser = merged_state_dict(generator.denoiser)
    vae = _prefixed(VAE_PREFIX, vae_to_original(merged_state_dict(pipe.vae), pipe.vae.config))
    encoders = {name: merged_state_dict(module) for name, module in generator.text_encoders.items()}
    if family == "sd":
        text_encoder = encoders["text_encoder"]
        if uses_open_clip(generator):
            text = _prefixed("cond_stage_model.model.", clip_to_open_clip(text_encoder))
        else:
            text = _prefixed("cond_stage_model.transformer.", clip_to_transformers_layout(text_encoder))
        unet = _prefixed(UNET_PREFIX, unet_to_original(denoiser, generator.denoiser.config))
        return {**unet, **vae, **text, **_prediction_markers(generator)}
    if family == "sdxl":
        text = {
            **_prefixed("conditioner.embedders.0.transformer.", clip_to_transformers_layout(encoders["text_encoder"])),
            **_prefixed("conditioner.embedders.1.model.", clip_to_open_clip(encoders["text_encoder_2"])),
        }
        unet = _prefixed(UNET_PREFIX, unet_to_original(denoiser, generator.denoiser.config))
        return {**unet, **vae, **text, **_prediction_markers(generator)}
    if family == "sd3":
        transformer = _prefixed(UNET_PREFIX, sd3_transformer_to_original(denoiser, generator.denoiser.config))
        text = {}
        if "text_encoder" in encoders:
            clip_l = clip_to_transformers_layout(encoders["text_encoder"])
            projection = clip_l.pop("text_projection.weight", None)
            # SD3's CLIP-L has no projection: the reference code and every single-file reader use
            # the identity, so a trained one cannot be stored.
            identity = torch.eye(projection.shape[0], dtype=projection.dtype) if projection is not None else None
            if projection is not None and not torch.equal(projection, identity):
                raise ExportError(
                    "text_encoder (CLIP-L) has a text_projection that is not the identity; the SD3 single-file "
                    "layout has none (readers use the identity), so the exported model would differ"
                )
            text.update(_prefixed("text_encoders.clip_l.transformer.", clip_l))
        if "text_encoder_2" in encoders:
            clip_g = clip_to_transformers_layout(encoders["text_encoder_2"])
            text.update(_prefixed("text_encoders.clip_g.transformer.", clip_g))
        if "text_encoder_3" in encoders:
            text.update(_prefixed("text_encoders.t5xxl.transformer.", encoders["text_encoder_3"]))
        return {**transformer, **vae, **text}
    raise ExportError(f"family {family!r} has no original single-file layout; export supports 'sd', 'sdxl' and 'sd3'")


def _prediction_markers(generator) -> dict[str, Tensor]:
    """The empty ``v_pred`` / ``ztsnr`` tensors by which ComfyUI recognises v-prediction and
    zero-terminal-SNR SDXL checkpoints (the original layout has no scheduler config)."""
    if generator.family != "sdxl" or generator.prediction_type != "v_prediction":
        return {}
    markers = {"v_pred": torch.tensor([])}
    if generator.scheduler.config.get("rescale_betas_zero_snr", False):
        markers["ztsnr"] = torch.tensor([])
    return markers


def architecture(generator) -> str:
    """Stability's ModelSpec architecture id, written to the file's metadata."""
    if generator.family == "sd" and uses_open_clip(generator):
        return "stable-diffusion-v2-768-v" if generator.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    names = {"sd": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base", "sd3": "stable-diffusion-v3-medium"}
    return names[generator.family]


def export_single_file(
    source,
    path: str | os.PathLike,
    *,
    lora: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    title: str | None = None,
    **load_kwargs,
) -> Path:
    """Write ``source`` as one original-layout ``.safetensors`` checkpoint at ``path``.

    ``source``: a :class:`~visalign.models.Generator` (its LoRA adapters, if any, are merged),
    or anything :func:`~visalign.models.load_generator` reads (a diffusers folder, a hub id, a
    single file), loaded on the CPU with ``load_kwargs`` (``config=``, ``family=``, ...).
    ``lora``: a diffusers-format LoRA file or folder (what ``save_lora`` writes) to merge in.
    ``dtype``: ``"fp16"``, ``"bf16"``, ``"fp32"`` (or a ``torch.dtype``); default: the weights'
    own (float32 for a model loaded from a path). ``title`` goes into the file's ModelSpec
    metadata. Returns ``path``.
    """
    from safetensors.torch import save_file

    from .base import Generator
    from .loading import load_generator, parse_dtype

    path = Path(path)
    if path.suffix not in (".safetensors", ".sft"):
        raise ExportError(f"{path}: the single-file checkpoint must end in .safetensors")
    if isinstance(source, Generator) and load_kwargs:
        raise ExportError(f"{sorted(load_kwargs)}: loading options apply to a path, not to a Generator")
    generator = source if isinstance(source, Generator) else load_generator(source, device="cpu", **load_kwargs)
    if lora is not None:
        if generator is source:
            raise ExportError("lora= merges a LoRA into a model loaded from a path; for a Generator call load_lora() first")
        generator.load_lora(lora)
    dtype = parse_dtype(dtype)
    state = original_state_dict(generator)
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        # safetensors refuses tensors that share memory (tied weights, or views that diffusers'
        # single-file loader made of one fused tensor): copy those.
        storage = value.untyped_storage().data_ptr()
        if value.numel() and storage in storages:
            value = value.clone()
            storage = value.untyped_storage().data_ptr()
        storages.add(storage)
        tensors[key] = value.contiguous()
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(generator),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or path.stem,
        "visalign.prediction_type": generator.prediction_type,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
