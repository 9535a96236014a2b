"""Finding a model's family and loading it: diffusers folders, hub repo ids, single files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import ModelLoadError

# diffusers' single-file model types (infer_diffusers_model_type) that are variants of a family
# that the Generator cannot drive (extra input channels, a refiner without the base's encoders).
UNSUPPORTED_SINGLE_FILE_TYPES = (
    "inpainting", "inpainting_v2", "xl_inpaint", "xl_refiner", "upscale", "instruct-pix2pix",
    "controlnet", "controlnet_xl_large", "controlnet_xl_mid", "controlnet_xl_small",
)

# Original-layout key of each text encoder's position embedding, by family and pipeline
# component: how a loaded pipeline is checked against the file (see verify_single_file_pipeline).
SINGLE_FILE_TEXT_ENCODER_KEYS = {
    "sd": {
        "text_encoder": (
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",  # SD 1.x
            "cond_stage_model.model.positional_embedding",  # SD 2.x (OpenCLIP)
        ),
    },
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",),
        "text_encoder_2": ("conditioner.embedders.1.model.positional_embedding",),
    },
    "sd3": {
        "text_encoder": ("text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",),
        "text_encoder_2": ("text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight",),
    },
}


def _pipeline_families() -> dict[str, str]:
    """Pipeline class name (model_index.json ``_class_name``) → family, from the registry."""
    from . import FAMILIES

    return {name: family for family, cls in FAMILIES.items() for name in cls.pipeline_class_names}


def pipeline_class_for(family: str):
    """The diffusers pipeline class of ``family`` (the first of its ``pipeline_class_names``)."""
    import diffusers

    return getattr(diffusers, _family_class(family).pipeline_class_names[0])


def read_model_index(path: str | os.PathLike, **kwargs) -> dict:
    """``model_index.json`` of a local diffusers folder or hub repo, with a clear error otherwise."""
    local = Path(path)
    if local.exists():
        if local.is_file():
            raise ModelLoadError(
                f"{local} is a file; a diffusers model is a folder with model_index.json "
                f"(for a single .safetensors checkpoint use load_generator(..., family=...) or from_single_file)"
            )
        index = local / "model_index.json"
        if not index.exists():
            raise ModelLoadError(
                f"{local} is not a diffusers model folder: it has no model_index.json "
                f"(expected the layout written by save_pretrained: model_index.json, unet/ or transformer/, vae/, ...)"
            )
        try:
            return json.loads(index.read_text())
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{index} is not valid JSON: {error}") from None
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(str(path), **kwargs))
    except Exception as error:  # hub errors vary by version; name the path either way
        raise ModelLoadError(f"cannot read model_index.json of {path!r}: {error}") from None


def detect_family(path: str | os.PathLike, **kwargs) -> str:
    index = read_model_index(path, **kwargs)
    class_name = index.get("_class_name")
    families = _pipeline_families()
    if class_name not in families:
        raise ModelLoadError(
            f"{path} holds a {class_name!r} pipeline, which visalign does not support; supported: {sorted(families)}"
        )
    return families[class_name]


def read_single_file_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a ``.safetensors`` file (its header only), or a clear error for a file
    that is not one: truncated (an interrupted download), corrupt, or another format."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # SafetensorError, OSError: the reason is in the message
        raise ModelLoadError(
            f"{path} is not a readable .safetensors file ({error}); it may be truncated (an interrupted "
            f"download or copy) or not a safetensors file at all"
        ) from None


def infer_single_file_family(path: str | os.PathLike) -> str:
    """The family of an original-layout single ``.safetensors`` checkpoint, from its keys.

    The family follows from which original modules the file holds (an MMDiT's ``joint_blocks``:
    ``sd3``; SDXL's ``conditioner.embedders``: ``sdxl``; ``cond_stage_model``: ``sd``), so it is
    right for any size of model. diffusers' own detection (which matches real checkpoints'
    tensor shapes) then refuses variants the Generator cannot drive, such as inpainting models.
    Only the header and a few small tensors are read.
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    keys = read_single_file_keys(path)
    denoiser = [key for key in keys if key.startswith("model.diffusion_model.")]
    if not denoiser:
        raise ModelLoadError(f"{path} is not an original-layout SD/SDXL/SD3 checkpoint: {_describe_foreign_keys(keys)}")
    with safe_open(str(path), framework="pt") as handle:
        model_type = infer_diffusers_model_type(_LazyCheckpoint(handle))
    if model_type in UNSUPPORTED_SINGLE_FILE_TYPES:
        raise ModelLoadError(
            f"{path} is a {model_type!r} checkpoint, which visalign does not support (text-to-image SD 1.x/2.x, "
            f"SDXL base and SD3 only)"
        )
    if any(key.startswith("model.diffusion_model.joint_blocks.") for key in denoiser):
        return "sd3"
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(key.startswith("cond_stage_model.") for key in keys):
        return "sd"
    raise ModelLoadError(
        f"{path} holds a denoiser (model.diffusion_model.*) but no text encoder to tell its family from "
        f"(cond_stage_model.* for SD, conditioner.embedders.* for SDXL); pass family= explicitly"
    )


def _describe_foreign_keys(keys: list[str]) -> str:
    if not keys:
        return "it holds no tensors"
    sample = ", ".join(repr(key) for key in keys[:3])
    if any("lora" in key.lower() for key in keys):
        return f"it looks like a LoRA file (keys such as {sample}); load it with generator.load_lora(path)"
    if any(key.startswith(("down_blocks.", "transformer_blocks.", "unet.", "transformer.", "encoder.down_blocks.")) for key in keys):
        return (f"its keys ({sample}, ...) are in the diffusers layout; a diffusers model is a folder "
                f"with model_index.json, loaded with load_generator(folder)")
    return (f"no denoiser weights under 'model.diffusion_model.' (its keys start {sample}); expected the "
            f"layout of A1111/ComfyUI checkpoints or visalign export")


class _LazyCheckpoint(dict):
    """A dict view of a safetensors file whose values are read on access."""

    def __init__(self, handle):
        super().__init__({key: None for key in handle.keys()})
        self._handle = handle

    def __getitem__(self, key):
        return self._handle.get_tensor(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub repo id (``name`` or ``owner/name``, hub characters
    only): what is not cannot be fetched, so a missing local path is reported as one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_error(error: BaseException) -> bool:
    """Whether ``error`` came from reaching (or failing to reach) the Hugging Face hub."""
    return type(error).__module__.startswith("huggingface_hub") or isinstance(error, (OSError, ConnectionError))


def verify_single_file_pipeline(pipe, path: str | os.PathLike, family: str) -> None:
    """Check a pipeline built by diffusers' ``from_single_file`` against the file.

    diffusers leaves any weight it could not map on the meta device without an error, and it
    tells text encoders apart by their widths (real SDXL: 768 and 1280), so encoders of equal
    width get the wrong weights. Both are turned into errors that say what happened.
    """
    from safetensors import safe_open

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        missing = [n for n, p in list(component.named_parameters()) + list(component.named_buffers()) if p.is_meta]
        if missing:
            raise ModelLoadError(
                f"{path}: {name} has {len(missing)} weights the checkpoint did not provide "
                f"(e.g. {missing[:3]}); the file lacks them or diffusers could not map its keys"
            )
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        for name, candidates in SINGLE_FILE_TEXT_ENCODER_KEYS.get(family, {}).items():
            encoder = getattr(pipe, name, None)
            key = next((k for k in candidates if k in stored), None)
            if encoder is None or key is None:  # not in the file: diffusers took it from the config folder
                continue
            loaded = getattr(encoder, "text_model", encoder).embeddings.position_embedding.weight
            expected = handle.get_tensor(key).to(device=loaded.device, dtype=loaded.dtype)
            if loaded.shape != expected.shape or not torch.equal(loaded, expected):
                raise ModelLoadError(
                    f"{path}: {name} does not hold the weights the file stores for it ({key} differs). diffusers "
                    f"tells text encoders apart by their width, so a checkpoint whose text encoders are equally "
                    f"wide (no real SDXL or SD3 checkpoint) gets them mixed up; load {name} yourself and pass it "
                    f"to from_single_file(path, {name}=...)"
                )


def load_generator(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attention: str = "auto",
    motion_adapter=None,
    config: str | os.PathLike | None = None,
    **kwargs,
):
    """Load any supported model as a :class:`~visalign.models.Generator`.

    ``path``: a diffusers folder, a hub repo id, or an original-layout single ``.safetensors``
    file. ``family`` (``"sd"``, ``"sdxl"``, ``"sd3"``, or the video families ``"modelscope"``,
    ``"animatediff"``, ``"wan"``) is detected when omitted; when given for a folder, a mismatch
    is an error. ``torch_dtype`` may be a string (``"float16"``, ``"bf16"``, ...). Video
    families also take ``num_frames``, ``height`` and ``width``: the clip size sampled by default.

    ``config`` applies to a single file only: a diffusers folder (or hub id) of the same
    architecture whose configs diffusers maps the file's keys with. Offline it must be a local
    folder; its weights are not needed. With a folder or hub id as ``path`` it is an error (the
    model carries its own configs).

    ``motion_adapter`` (a ``MotionAdapter``, its folder or hub id) makes the ``animatediff``
    family of an SD 1.x model, a folder, hub id or single file alike:
    ``load_generator(sd15, motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2")``, and for a
    CivitAI-style fine-tune ``load_generator("model.safetensors", motion_adapter=..., config=<a local
    SD 1.x folder, when offline>)``. ``family="animatediff"`` without an adapter on an SD model is
    an error that asks for one.
    """
    torch_dtype = parse_dtype(torch_dtype)
    if motion_adapter is not None:
        family = family or "animatediff"
        if family != "animatediff":
            raise ModelLoadError(f"motion_adapter= belongs to family='animatediff' (SD + AnimateDiff), not family={family!r}")
        kwargs["motion_adapter"] = motion_adapter
    local = Path(path)
    if config is not None and not local.is_file():
        # from_pretrained would take config= as a pipeline keyword and fail far from the cause.
        if local.suffix in (".safetensors", ".sft"):
            raise ModelLoadError(f"single-file checkpoint {path} does not exist")
        what = "a folder" if local.is_dir() else "a hub repo id or a missing path, not a file"
        raise ModelLoadError(
            f"single_file_config/config= applies to single-file checkpoints; {path} is {what}. A diffusers "
            f"model carries its own configs: leave config out"
        )
    if local.is_file():
        family = family or infer_single_file_family(local)
        return _family_class(family).from_single_file(local, config=config, torch_dtype=torch_dtype, device=device,
                                                      attention=attention, **kwargs)
    family = family or detect_family(path, **{k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs})
    # The family class refuses a folder of another family (AnimateDiff takes SD with an adapter).
    return _family_class(family).from_pretrained(path, torch_dtype=torch_dtype, device=device, attention=attention, **kwargs)


def _family_class(family: str):
    from . import FAMILIES

    if family not in FAMILIES:
        raise ModelLoadError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family]


def dtype_kwargs(torch_dtype: torch.dtype | None) -> dict:
    """The dtype argument of diffusers' loaders: ``dtype`` in new releases, ``torch_dtype`` before.

    ``None`` means float32 for every component: transformers 5 otherwise keeps a checkpoint's own
    dtype for the text encoders ("auto"), so an fp16 folder would give an fp32 denoiser beside an
    fp16 text encoder (slow and imprecise on CPU, and diffusers warns on ``.to("cpu")``).
    """
    if torch_dtype is None:
        torch_dtype = torch.float32
    try:
        from diffusers.utils import deprecation_utils

        new_name = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    except ImportError:
        new_name = False
    return {"dtype": torch_dtype} if new_name else {"torch_dtype": torch_dtype}


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _count_parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                numel = 1
                for dim in handle.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total


def describe_model(path: str | os.PathLike) -> dict:
    """What a local model folder is, read from its configs and safetensors headers (no weights loaded)."""
    folder = Path(path)
    index = read_model_index(folder)
    family = detect_family(folder)
    family_class = _family_class(family)
    info: dict = {"path": str(folder), "pipeline": index["_class_name"], "family": family}
    denoiser = family_class.denoiser_name
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    info["scheduler"] = scheduler_config.get("_class_name")
    info["prediction_type"] = "flow" if family_class.is_flow else scheduler_config.get("prediction_type", "epsilon")
    denoiser_config = _read_json(folder / denoiser / "config.json")
    vae_config = _read_json(folder / "vae" / "config.json")
    # Video VAEs (Wan) state their factors; image VAEs halve the size per extra block.
    scale = vae_config.get("scale_factor_spatial") or 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
    info["denoiser"] = denoiser_config.get("_class_name")
    info["latent_channels"] = denoiser_config.get("in_channels")
    sample_size = denoiser_config.get("sample_size")
    info["resolution"] = sample_size * scale if sample_size else None  # a DiT like Wan's has none
    info["vae_scale_factor"] = scale
    info["video"] = bool(getattr(family_class, "is_video", False))
    if "scale_factor_temporal" in vae_config:
        info["vae_temporal_scale_factor"] = vae_config["scale_factor_temporal"]
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        entry = {"class": spec[1]}
        params = _count_parameters(folder / name) if (folder / name).is_dir() else None
        if params is not None:
            entry["parameters"] = params
        components[name] = entry
    info["components"] = components
    return info


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ModelLoadError(f"{path.parent.parent} is incomplete: {path.relative_to(path.parent.parent)} is missing")
    return json.loads(path.read_text())
