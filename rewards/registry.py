"""Names -> reward builders: ``rewards.load(name, **options)``, ``rewards.available()``, ``rewards.register``.

Built-in entries are ``"module:function"`` strings, imported on first use, so ``import
rewards`` stays light (no open_clip/transformers import until a CLIP reward is built).
Third parties register a callable (a function or a :class:`~rewards.base.Reward` subclass)::

    @rewards.register("sharpness")
    def build_sharpness(kernel_size: int = 3) -> Reward:
        ...

    rewards.load("sharpness", kernel_size=5)

Options are checked against the builder's signature before it runs, so a typo gives an error
listing the options the reward accepts.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Reward

__all__ = ["register", "load", "available", "describe", "load_pretrained", "REWARD_CONFIG_NAME"]

#: Written next to a saved reward (``save_pretrained``) so ``load_pretrained(dir)`` knows what it is.
REWARD_CONFIG_NAME = "reward.json"


@dataclass
class _Entry:
    target: Callable[..., Reward] | str
    description: str = ""

    def resolve(self, name: str) -> Callable[..., Reward]:
        if callable(self.target):
            return self.target
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            builder = getattr(module, attribute)
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"reward {name!r} is registered as {self.target!r}, which cannot be imported: {error}"
            ) from error
        self.target = builder
        return builder


_REGISTRY: dict[str, _Entry] = {
    "clip": _Entry("rewards.clip:build_clip", "CLIP score (cosine x scale) with any open_clip model"),
    "hpsv2": _Entry("rewards.hpsv2:build_hpsv2", "HPS v2 / v2.1 human preference score (open_clip ViT-H-14)"),
    "pickscore": _Entry("rewards.pickscore:build_pickscore", "PickScore (transformers CLIP; exp(logit_scale) x cosine)"),
    "aesthetic": _Entry("rewards.aesthetic:build_aesthetic", "LAION improved aesthetic predictor (MLP on CLIP ViT-L/14)"),
    "personal": _Entry("rewards.personal:build_personal", "cosine to a user embedding built from pairwise choices"),
    "video-from-image": _Entry("rewards.video:build_video_from_image", "segmental frame sampling + temporal attenuation (InstructVideo)"),
    "frame-average": _Entry("rewards.video:build_frame_average", "mean of an image reward over every frame"),
    "temporal-consistency": _Entry("rewards.video:build_temporal_consistency", "similarity of consecutive frames"),
    "learned-video": _Entry("rewards.video:build_learned_video_reward", "learned text-video scorer: frame CNN + temporal transformer + prompt"),
    "testbed-oracle": _Entry("visalign.testbed.oracle:OracleReward", "exact oracle of the visalign testbed"),
    "testbed-video-oracle": _Entry("visalign.testbed.video:VideoOracleReward", "exact oracle of the video testbed (motion, identity, smoothness)"),
    "testbed-reward": _Entry("visalign.testbed.reward_build:load_testbed_reward", "learned HPS-style reward of the visalign testbed (assets/testbed/reward)"),
    "testbed-video-reward": _Entry("visalign.testbed.video_reward:load_testbed_video_reward", "learned video reward of the video testbed (assets/testbed/video_reward)"),
    "testbed-clip": _Entry("visalign.testbed.reward_build:load_testbed_clip", "learned CLIP-score-style reward of the visalign testbed (assets/testbed/clip)"),
}


def register(name: str, builder: Callable[..., Reward] | None = None, *, description: str = "", overwrite: bool = False):
    """Register ``builder`` (a function or Reward class returning a Reward) under ``name``.

    Use as ``register("name", builder)`` or as a decorator ``@register("name")``. Registering an
    existing name raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a reward name must be a non-empty string")

    def decorator(target: Callable[..., Reward]) -> Callable[..., Reward]:
        if not callable(target):
            raise TypeError(f"cannot register {target!r} as reward {name!r}: it is not callable")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
        doc = description or (inspect.getdoc(target) or "").split("\n")[0]
        _REGISTRY[name] = _Entry(target, doc)
        return target

    return decorator(builder) if builder is not None else decorator


def available() -> list[str]:
    """Names that :func:`load` accepts, sorted."""
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    """``{name: one-line description}`` of every registered reward."""
    return {name: _REGISTRY[name].description for name in available()}


def _accepted_options(builder: Callable[..., Any]) -> tuple[list[str], bool]:
    signature = inspect.signature(builder)
    names = [
        parameter.name for parameter in signature.parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and parameter.name != "self"
    ]
    takes_any = any(parameter.kind is parameter.VAR_KEYWORD for parameter in signature.parameters.values())
    return names, takes_any


def load(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name`` with ``options`` (see ``docs/rewards.md``).

    ``name`` may also be a directory written by a reward's ``save_pretrained`` (it holds a
    ``reward.json``); that is the same as :func:`load_pretrained`.
    """
    if name not in _REGISTRY and Path(name).is_dir() and (Path(name) / REWARD_CONFIG_NAME).is_file():
        return load_pretrained(name, **options)
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; available rewards: {', '.join(available())}")
    builder = _REGISTRY[name].resolve(name)
    accepted, takes_any = _accepted_options(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise TypeError(
            f"reward {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(accepted) or '(none)'}"
        )
    reward = builder(**options)
    if not isinstance(reward, Reward):
        raise TypeError(f"the builder of reward {name!r} returned {type(reward).__name__}, not a rewards.Reward")
    return reward


def load_pretrained(directory: str | os.PathLike, **overrides: Any) -> Reward:
    """Load a reward saved with ``save_pretrained``: ``reward.json`` names the reward and its
    options; the folder itself is passed as the ``model`` option (its weights)."""
    directory = Path(directory)
    config_path = directory / REWARD_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {directory} was not written by a reward's save_pretrained")
    config = json.loads(config_path.read_text())
    if "reward" not in config:
        raise ValueError(f"{config_path} has no 'reward' entry naming the reward")
    # Saved rewards take their weights folder as ``model``.
    options = {"model": str(directory), **config.get("options", {}), **overrides}
    return load(config["reward"], **options)


def write_reward_config(directory: str | os.PathLike, reward: str, options: dict[str, Any]) -> Path:
    """Write ``reward.json`` (used by ``save_pretrained`` implementations)."""
    path = Path(directory) / REWARD_CONFIG_NAME
    path.write_text(json.dumps({"reward": reward, "options": options}, indent=2) + "\n")
    return path
