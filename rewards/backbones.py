"""Dual image/text encoders behind the CLIP-family rewards.

Two implementations of one small interface, so rewards and reward-model training never care
which library holds the weights:

- :class:`OpenClipBackbone` — an ``open_clip`` model (CLIP score, HPSv2, the aesthetic
  predictor's ViT-L/14, the personal reward's image encoder).
- :class:`TransformersClipBackbone` — a ``transformers.CLIPModel`` (PickScore).

Interface: ``embed_images(images) -> [B, D]`` and ``embed_texts(prompts) -> [B, D]`` (both
L2-normalised, float32), ``logit_scale()`` (the exponentiated CLIP temperature, a scalar
tensor), ``save_pretrained(directory)``. Images are float ``[B, 3, H, W]`` in [0, 1] (or a
list of ``[3, H, W]``); the backbone owns its torch preprocessing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visalign.token_cache import CachingTokenizer

from .checkpoints import CheckpointError, load_state_dict_strict, read_state_dict, resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

logger = logging.getLogger(__name__)

__all__ = ["OpenClipBackbone", "TransformersClipBackbone", "unique_prompts", "is_model_folder"]

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"
# Weight file names open_clip looks for in a model folder, most preferred first.
_OPEN_CLIP_WEIGHT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin",
)


def unique_prompts(prompts: Sequence[str]) -> tuple[list[str], Tensor]:
    """Deduplicate prompts: ``(unique, index)`` with ``unique[index[i]] == prompts[i]``.

    Rewards often see one prompt repeated across a group of samples; encoding it once is exact.
    """
    position: dict[str, int] = {}
    index = [position.setdefault(prompt, len(position)) for prompt in prompts]
    return list(position), torch.tensor(index, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the open_clip config {path}: {error}") from error


def _model_from_config(model_cfg: dict) -> nn.Module:
    import open_clip

    model_cfg = copy.deepcopy(model_cfg)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ValueError(f"open_clip model config lacks {key!r}; got keys {sorted(model_cfg)}")
    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa configs (multimodal_cfg) are not supported as reward backbones")
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg["text_cfg"]
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return model_class(**model_cfg)


def _tokenizer_for_config(model_cfg: dict):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))


def _find_weights_in_dir(directory: Path) -> Path | None:
    for name in _OPEN_CLIP_WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def _adapt_open_clip_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    # The same small fixes open_clip.load_checkpoint applies to published checkpoints.
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state_dict and "logit_scale" in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(model.logit_bias)
    state_dict.pop("text.transformer.embeddings.position_ids", None)
    return state_dict


class OpenClipBackbone(nn.Module):
    """An open_clip CLIP model with its tokenizer and torch preprocessing.

    Build it with :meth:`create`; ``model_config`` (the open_clip config dict) is kept so the
    backbone can :meth:`save_pretrained` itself as an open_clip ``local-dir`` folder.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: ImagePreprocess, model_config: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_config = copy.deepcopy(model_config)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model: str | os.PathLike | dict = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        preprocess: dict | None = None,
    ) -> "OpenClipBackbone":
        """Build an open_clip backbone.

        Args:
            model: the architecture: an open_clip model name (``"ViT-H-14"``), a config dict or
                ``.json`` file (``{"embed_dim", "vision_cfg", "text_cfg"}``), a folder written
                by :meth:`save_pretrained` / open_clip (``open_clip_config.json`` + weights; also
                ``"local-dir:PATH"``), or ``"hf-hub:org/repo"``.
            pretrained: the weights: ``None`` (random init, or the folder's own weights), a
                local file (``.safetensors``/``.pt``/``.bin``; a ``"state_dict"`` entry and a
                ``module.`` prefix are handled), ``"hf-hub:org/repo/file"``, or an open_clip
                pretrained tag such as ``"laion2b_s32b_b79k"`` (downloaded by open_clip).
            preprocess: overrides of the preprocessing (``size``, ``mean``, ``std``,
                ``interpolation``, ``resize_mode``).
        """
        import open_clip

        preprocess_cfg: dict = {}
        weights: Path | None = None
        builtin_name: str | None = None
        if isinstance(model, dict):
            model_cfg = copy.deepcopy(model.get("model_cfg", model))
            preprocess_cfg = dict(model.get("preprocess_cfg", {}))
            model_name = "custom"
        else:
            model_name = str(model)
            path = Path(model_name[len("local-dir:"):] if model_name.startswith("local-dir:") else model_name).expanduser()
            if model_name.startswith("hf-hub:"):
                return cls._from_open_clip_factory(model_name, None, preprocess)
            if path.is_dir():
                config_path = path / OPEN_CLIP_CONFIG_NAME
                if not config_path.is_file():
                    raise FileNotFoundError(f"{path} is not an open_clip model folder: {config_path} is missing")
                config = _read_json(config_path)
                model_cfg = config.get("model_cfg", config)
                preprocess_cfg = dict(config.get("preprocess_cfg", {}))
                weights = _find_weights_in_dir(path)
            elif path.suffix == ".json":
                if not path.is_file():
                    raise FileNotFoundError(f"open_clip model config not found: {path}")
                config = _read_json(path)
                model_cfg = config.get("model_cfg", config)
                preprocess_cfg = dict(config.get("preprocess_cfg", {}))
            elif model_name in open_clip.list_models():
                if pretrained is not None and not _looks_like_path(pretrained):
                    return cls._from_open_clip_factory(model_name, str(pretrained), preprocess)
                model_cfg = open_clip.get_model_config(model_name)
                builtin_name = model_name
            else:
                known = open_clip.list_models()
                raise ValueError(
                    f"unknown open_clip architecture {model_name!r}: give a model name ({', '.join(known[:8])}, ... "
                    f"{len(known)} in all), a config .json file, an open_clip model folder, or 'hf-hub:org/repo'"
                )
        if pretrained is not None:
            weights = resolve_file(pretrained, "open_clip checkpoint")

        network = _model_from_config(model_cfg)
        if weights is not None:
            state_dict = _adapt_open_clip_state_dict(network, read_state_dict(weights))
            load_state_dict_strict(network, state_dict, weights)
        size = model_cfg["vision_cfg"].get("image_size", 224)
        preprocess_cfg = {"size": size if isinstance(size, int) else size[0], **preprocess_cfg, **(preprocess or {})}
        # For built-in names open_clip knows the exact tokenizer (e.g. SigLIP's); otherwise read the config.
        tokenizer = open_clip.get_tokenizer(builtin_name) if builtin_name else _tokenizer_for_config(model_cfg)
        return cls(network, tokenizer, _preprocess_from_open_clip_cfg(preprocess_cfg), model_cfg)

    @classmethod
    def _from_open_clip_factory(cls, model_name: str, pretrained: str | None, preprocess: dict | None) -> "OpenClipBackbone":
        """Named weights (a pretrained tag or hf-hub repo): let open_clip resolve and download them."""
        import open_clip

        quick_gelu = False
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise CheckpointError(
                    f"{pretrained!r} is neither a local file nor a pretrained tag of {model_name!r} (tags: {tags})"
                )
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        try:
            network = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"open_clip could not build {model_name!r} with weights {pretrained!r}: {error}. Without hub "
                f"access, download the weights and pass a local file as `pretrained`."
            ) from error
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is not None and quick_gelu:
            model_cfg["quick_gelu"] = True
        preprocess_cfg = {**open_clip.get_model_preprocess_cfg(network), **(preprocess or {})}
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(network, tokenizer, _preprocess_from_open_clip_cfg(preprocess_cfg), model_cfg)

    # -- the interface -----------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        output_dim = getattr(self.model.visual, "output_dim", None)
        return int(output_dim if output_dim is not None else self.model_config["embed_dim"])

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts))

    def embed_images(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """Float images in [0, 1] ``[B, 3, H, W]`` -> L2-normalised image embeddings ``[B, D]``."""
        pixels = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(pixels.to(dtype), normalize=True).float()

    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """``B`` prompts -> L2-normalised text embeddings ``[B, D]`` (each distinct prompt encoded once)."""
        unique, index = unique_prompts(prompts)
        device = next(self.model.parameters()).device
        tokens = self.tokenize(unique).to(device)
        return self.model.encode_text(tokens, normalize=True).float()[index.to(device)]

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float().squeeze()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (an open_clip
        ``local-dir`` folder: ``open_clip.create_model("local-dir:DIR")`` reads it too)."""
        from safetensors.torch import save_file

        if self.model_config is None:
            raise ValueError("this backbone was built without an open_clip config, so it cannot be saved as a folder")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": self.model_config, "preprocess_cfg": _open_clip_cfg_from_preprocess(self.preprocess)}
        (directory / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state_dict = {name: tensor.detach().contiguous().cpu() for name, tensor in self.model.state_dict().items()}
        save_file(state_dict, str(directory / OPEN_CLIP_WEIGHTS_NAME))
        return directory


def is_model_folder(model: Any) -> bool:
    """Whether ``model`` names a saved model folder (a directory, or ``"local-dir:DIR"``)."""
    if isinstance(model, dict):
        return False
    text = str(model)
    text = text[len("local-dir:"):] if text.startswith("local-dir:") else text
    return Path(text).expanduser().is_dir()


def _looks_like_path(value: str | os.PathLike) -> bool:
    text = str(value)
    return isinstance(value, os.PathLike) or text.startswith(("hf-hub:", "/", ".", "~")) or os.sep in text \
        or Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _preprocess_from_open_clip_cfg(cfg: dict) -> ImagePreprocess:
    size = cfg.get("size", 224)
    size = size if isinstance(size, int) else int(size[0])
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"unsupported open_clip resize_mode {resize_mode!r} (supported: 'shortest', 'squash')")
    return ImagePreprocess(
        size=size, crop_size=size, mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)), std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
        resize_mode=resize_mode, interpolation=cfg.get("interpolation", "bicubic"),
    )


def _open_clip_cfg_from_preprocess(preprocess: ImagePreprocess) -> dict:
    return {
        "size": preprocess.crop_size, "mean": preprocess.mean.flatten().tolist(), "std": preprocess.std.flatten().tolist(),
        "interpolation": preprocess.interpolation, "resize_mode": preprocess.resize_mode,
    }


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------

_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


def _is_local_reference(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local folder: it exists, or it cannot be a hub repo id."""
    from visalign.models.loading import is_repo_id

    text = str(path)
    return Path(text).expanduser().exists() or not is_repo_id(text)


class TransformersClipBackbone(nn.Module):
    """A ``transformers.CLIPModel`` with its tokenizer and the torch equivalent of ``CLIPImageProcessor``.

    Embeddings follow ``CLIPModel.forward``: the pooled output of each tower through its
    projection, then L2 normalisation.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: ImagePreprocess, max_length: int = 77) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, processor: str | os.PathLike | None = None, max_length: int = 77) -> "TransformersClipBackbone":
        """Load the model from ``model`` and the tokenizer + image-processor config from
        ``processor`` (defaults to ``model``); each is a local folder or a hub repo id."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        processor = processor if processor is not None else model
        for what, reference in (("model", model), ("processor", processor)):
            if _is_local_reference(reference) and not Path(reference).expanduser().is_dir():
                raise CheckpointError(f"{what} folder not found: {reference}")
        try:
            network = CLIPModel.from_pretrained(str(model))
        except Exception as error:
            raise CheckpointError(f"cannot load a transformers CLIPModel from {model}: {error}") from error
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(processor))
            image_processor = CLIPImageProcessor.from_pretrained(str(processor))
        except Exception as error:
            raise CheckpointError(f"cannot load the CLIP tokenizer / image processor from {processor}: {error}") from error
        return cls(network, tokenizer, _preprocess_from_image_processor(image_processor, processor), max_length)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def embed_images(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        pixels = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        pooled = self.model.vision_model(pixel_values=pixels.to(dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        unique, index = unique_prompts(prompts)
        device = next(self.model.parameters()).device
        # Pad to the longest prompt as PickScore's processor call does; the causal text tower
        # makes the pooled (end-of-text) output independent of the padding length.
        if getattr(self, "_token_cache", None) is None or self._token_cache.tokenizer is not self.tokenizer:
            self._token_cache = CachingTokenizer(self.tokenizer)  # each distinct prompt tokenised once
        tokens = self._token_cache(unique, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)[index.to(device)]

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float().squeeze()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the transformers folder: model, tokenizer and ``preprocessor_config.json``."""
        from transformers import CLIPImageProcessor

        if self.preprocess.resize_mode != "shortest":
            raise ValueError("CLIPImageProcessor can only express resize_mode='shortest' (resize + centre crop)")
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        preprocess = self.preprocess
        CLIPImageProcessor(
            size={"shortest_edge": preprocess.size}, crop_size={"height": preprocess.crop_size, "width": preprocess.crop_size},
            image_mean=preprocess.mean.flatten().tolist(), image_std=preprocess.std.flatten().tolist(),
            resample={"bilinear": 2, "bicubic": 3}[preprocess.interpolation],
        ).save_pretrained(directory)
        return directory


def _size_entry(size: Any, *keys: str) -> Any:
    """Read ``keys`` (first present) from a size given as an int, a dict or a transformers ``SizeDict``."""
    if isinstance(size, int):
        return size
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value is not None:
            return value
    return None


def _preprocess_from_image_processor(processor: Any, source: Any) -> ImagePreprocess:
    if not getattr(processor, "do_center_crop", True):
        raise ValueError(f"{source}: image processors without a centre crop are not supported")
    size = _size_entry(processor.size, "shortest_edge", "height")
    crop_height, crop_width = _size_entry(processor.crop_size, "height"), _size_entry(processor.crop_size, "width")
    if size is None or crop_height is None or crop_height != crop_width:
        raise ValueError(f"{source}: unsupported size {processor.size} / crop_size {processor.crop_size} (need a shortest edge and a square crop)")
    resample = int(getattr(processor, "resample", 3))
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"{source}: resample={resample} is not supported (2: bilinear, 3: bicubic)")
    return ImagePreprocess(
        size=int(size), crop_size=int(crop_height), mean=tuple(processor.image_mean), std=tuple(processor.image_std),
        resize_mode="shortest", interpolation=_RESAMPLE_NAMES[resample],
    )
