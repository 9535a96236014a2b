"""Personalised generation: a user embedding from a few pairwise choices, and two routes to an image
for that user's taste behind one call.

- **User embedding** (the encoder behind the ``personal`` reward, :mod:`rewards.personal`): the
  normalised mean direction from rejected to chosen images in a frozen image-embedding space,
  from at least 4 choices. Saved as a plain safetensors tensor (key ``user_embedding``, the
  encoder's name in the metadata), interpolated spherically between users.
- **Routes** (:class:`Personaliser`):

  - ``"steer"`` (training-free): FK steering or best-of-N with the personal reward
    ``cos(encoder(image), user)`` (:mod:`pipelines`);
  - ``"ppd"``: the PPD user-conditioned model (:mod:`visalign.algorithms.ppd`), conditioned on
    the same embedding.

  ``strength`` in [0, 1] runs from the base model to the personal one: the PPD user branch's
  scale, or the FK potential scale ``lambda = strength * lmbda`` (best-of-N: 0 is one plain
  sample). ``strength = 0`` gives the plain sample of the same seed on both routes.

Encoders: ``"testbed"`` is :class:`PixelEncoder`, a fixed pooled-pixel embedding that needs no
weights (the testbed's images are 32-pixel coloured shapes whose tastes — background darkness,
size, position, warmth — are pixel statistics); any other name is an open_clip model name or
folder (``ViT-L-14`` with ``pretrained="openai"`` is what the ``personal`` reward uses).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import configclass, field
from rewards.personal import (
    MIN_CHOICES,
    PersonalReward,
    interpolate_user_embeddings,
    load_user_embedding,
    save_user_embedding,
    user_embedding_from_choices,
)

__all__ = [
    "PixelEncoder", "load_encoder", "embed_user", "save_user", "load_user", "interpolate_users",
    "Personaliser", "ROUTES", "STEER_METHODS", "MIN_CHOICES", "TestbedPPDConfig",
]

ROUTES = ("steer", "ppd")
STEER_METHODS = ("fk", "best-of-n")


class PixelEncoder(nn.Module):
    """A fixed image embedding: images area-pooled to ``grid x grid`` RGB cells, centred on grey,
    L2-normalised → ``[B, 3 * grid^2]``. No weights; differentiable. The testbed's stand-in for a
    CLIP image encoder (documented as such: it sees colour and layout, not semantics)."""

    name = "testbed"

    def __init__(self, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    @property
    def embed_dim(self) -> int:
        return 3 * self.grid * self.grid

    def embed_images(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        if not isinstance(images, Tensor):
            images = torch.stack([F.interpolate(image[None].float(), size=(32, 32), mode="area")[0] for image in images])
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        pooled = F.adaptive_avg_pool2d(images.float(), self.grid) - 0.5
        return F.normalize(pooled.flatten(1), dim=-1)


def load_encoder(name: str = "testbed", pretrained: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen image encoder user embeddings live in: ``"testbed"`` (:class:`PixelEncoder`) or an
    open_clip model name / folder (see :meth:`rewards.backbones.OpenClipBackbone.create`)."""
    if name == "testbed":
        encoder = PixelEncoder()
    else:
        from rewards.backbones import OpenClipBackbone, is_model_folder

        encoder = OpenClipBackbone.create(name, None if is_model_folder(name) else pretrained)
        encoder.name = name
    return encoder.to(device).eval().requires_grad_(False)


def encoder_name(encoder: nn.Module) -> str:
    return getattr(encoder, "name", type(encoder).__name__)


@torch.no_grad()
def embed_user(encoder: nn.Module, chosen: Tensor, rejected: Tensor) -> Tensor:
    """A unit user embedding ``[D]`` from images the user chose ``[N, 3, H, W]`` over others
    (``N >= 4`` pairs, row ``i`` of ``chosen`` beat row ``i`` of ``rejected``)."""
    if len(chosen) != len(rejected):
        raise ValueError(f"got {len(chosen)} chosen and {len(rejected)} rejected images; they must pair up")
    device = next(iter(encoder.buffers()), torch.zeros(())).device
    return user_embedding_from_choices(encoder.embed_images(chosen.to(device)), encoder.embed_images(rejected.to(device))).cpu()


def save_user(path: str | os.PathLike, embedding: Tensor, encoder: nn.Module | str, **metadata: Any) -> Path:
    """Save a user embedding (safetensors, whatever the file's suffix) with its encoder's name."""
    name = encoder if isinstance(encoder, str) else encoder_name(encoder)
    return save_user_embedding(path, embedding, {"encoder": name, **metadata})


def load_user(path: str | os.PathLike) -> tuple[Tensor, dict]:
    """``(embedding [D], metadata)`` of a file written by :func:`save_user`."""
    from safetensors import safe_open

    embedding = load_user_embedding(path)
    with safe_open(str(path), framework="pt") as handle:
        info = handle.metadata() or {}
    return embedding, json.loads(info.get("metadata", "{}"))


def interpolate_users(start: Tensor, end: Tensor, weight: float) -> Tensor:
    """Between two users: ``weight=0`` is ``start``, 1 is ``end`` (spherical interpolation)."""
    return interpolate_user_embeddings(start, end, weight)


class Personaliser:
    """One API for both routes to a personal image.

    >>> personaliser = Personaliser(generator, load_encoder("testbed"), ppd="runs/ppd/user_branch.safetensors")
    >>> user = embed_user(personaliser.encoder, chosen_images, rejected_images)
    >>> images = personaliser.generate(["a red circle"], user, route="ppd", strength=1.0, seed=0)

    ``ppd`` is a user branch saved by :func:`visalign.algorithms.ppd.save_user_branch` (or ``None``:
    then only the steering route is available).
    """

    def __init__(self, generator, encoder: nn.Module, ppd: str | os.PathLike | None = None,
                 lmbda: float = 10.0, particles: int = 4) -> None:
        self.generator = generator
        self.encoder = encoder
        self.lmbda = lmbda
        self.particles = particles
        self.ppd_path = None
        if ppd is not None:
            from .algorithms.ppd import load_user_branch, user_dim

            load_user_branch(generator, ppd)
            if user_dim(generator) != encoder.embed_dim:
                raise ValueError(f"the PPD user branch takes {user_dim(generator)}-d users but the encoder "
                                 f"{encoder_name(encoder)!r} gives {encoder.embed_dim}-d embeddings")
            self.ppd_path = Path(ppd)
        self._reward: PersonalReward | None = None

    @property
    def routes(self) -> tuple[str, ...]:
        return ROUTES if self.ppd_path is not None else ("steer",)

    def personal_reward(self, user: Tensor) -> PersonalReward:
        """The ``personal`` reward of ``user`` on this encoder."""
        if self._reward is None:
            self._reward = PersonalReward(self.encoder)
        return self._reward.set_user(user)

    def check_user(self, user: Tensor) -> Tensor:
        if user.ndim != 1 or user.shape[0] != self.encoder.embed_dim:
            raise ValueError(f"a user embedding for encoder {encoder_name(self.encoder)!r} is a "
                             f"[{self.encoder.embed_dim}] tensor, got shape {tuple(user.shape)}")
        return user.float()

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], user: Tensor, route: str = "steer", strength: float = 1.0,
                 num_images_per_prompt: int = 1, seed: int = 0, num_inference_steps: int = 20,
                 guidance_scale: float = 5.0, method: str = "fk") -> Tensor:
        """Images ``[P * num_images_per_prompt, 3, H, W]`` for ``user``'s taste (prompt-major)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        user = self.check_user(user)
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if route == "ppd" and self.ppd_path is None:
            raise ValueError("route 'ppd' needs a trained PPD user branch (Personaliser(..., ppd=PATH))")
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        expanded = [p for p in prompts for _ in range(num_images_per_prompt)]
        rng = torch.Generator(device=self.generator.device).manual_seed(seed)
        common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=rng)
        if route == "ppd":
            from .algorithms.ppd import sample_personal, set_user_scale

            set_user_scale(self.generator, strength)
            try:
                return sample_personal(self.generator, expanded, user, **common).images
            finally:
                set_user_scale(self.generator, 1.0)
        if strength == 0:
            return self.generator.sample(expanded, **common).images
        reward = self.personal_reward(user)
        if method == "fk":
            from pipelines import FKSteering

            steer = FKSteering(self.generator, reward, num_particles=self.particles, lmbda=strength * self.lmbda)
        elif method == "best-of-n":
            from pipelines import BestOfN

            steer = BestOfN(self.generator, reward, n=self.particles)
        else:
            raise ValueError(f"method must be one of {STEER_METHODS}, got {method!r}")
        return steer(expanded, **common).images


def run_personal_sample(config, generator, prompts: list[str], out: Path, device: torch.device) -> dict:
    """``visalign sample user=USER.safetensors [route=ppd ppd=BRANCH] [strength=...]``."""
    from .config import ConfigError
    from .images import save_labelled_grid, save_png, slugify

    if config.route not in ROUTES:
        raise ConfigError(f"route must be one of {', '.join(ROUTES)}, got {config.route!r}")
    if config.route == "ppd" and not config.ppd:
        raise ConfigError("route=ppd needs ppd=PATH (a PPD user branch, see docs/personalisation.md)")
    if config.steer is not None:
        raise ConfigError("user= chooses its own route (route=steer|ppd); drop steer=")
    if not Path(config.user).is_file():
        raise ConfigError(f"user file {config.user} does not exist")
    user, metadata = load_user(config.user)
    encoder = load_encoder(metadata.get("encoder", "testbed"), device=device)
    personaliser = Personaliser(generator, encoder, ppd=config.ppd if config.route == "ppd" else None,
                                lmbda=config.steering.lmbda, particles=config.particles)
    images = personaliser.generate(prompts, user, route=config.route, strength=config.strength,
                                   num_images_per_prompt=config.num_images_per_prompt, seed=config.seed,
                                   num_inference_steps=config.steps, guidance_scale=config.guidance_scale).cpu()
    reward = personaliser.personal_reward(user)
    scores = reward(images.to(device), None).cpu()
    records = []
    for row, image in enumerate(images):
        p_index, i = divmod(row, config.num_images_per_prompt)
        path = save_png(image, out / f"{p_index:03d}-{slugify(prompts[p_index])}-{i}.png")
        records.append({"file": path.name, "prompt": prompts[p_index], "index": i, "personal_reward": float(scores[row])})
    grid = save_labelled_grid(images, prompts, out / "grid.png", per_row=config.num_images_per_prompt)
    with open(out / "samples.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return {"images": len(records), "grid": str(grid), "out": str(out), "family": generator.family,
            "route": config.route, "mean_personal_reward": float(scores.mean())}


@configclass
class TestbedPPDConfig:
    """The testbed's PPD build and efficacy run (``benchmarks/efficacy_personal.py``;
    ``assets/configs/personal/testbed_ppd.yaml``)."""

    model: str = field("assets/testbed/sd", help="the base model")
    out: str = field("runs/efficacy_personal", help="report.json goes here")
    save: str | None = field(None, help="also save the trained user branch here")
    load: str | None = field(None, help="evaluate this saved user branch instead of training one (the pool and "
                                        "training users are skipped)")
    strengths: list[float] = field(default_factory=lambda: [1.0],
                                   help="user-branch scales PPD is evaluated at (the demo's slider; 1 = as trained)")
    train_prompts: int = field(24, help="train prompts of the sample pool")
    per_prompt: int = field(4, help="base samples per train prompt")
    train_users: int = field(64, help="synthetic training users (random taste weights)")
    pairs_per_user: int = field(12, help="same-prompt pairs each training user labels")
    train_embed: str = field("pool", help="where training users make their 4 embedding choices: 'pool' (the "
                             "train-prompt pool) or 'choice' (base samples of the demo's choice prompts, as "
                             "held-out users and the demo's users do)")
    heldout_users: int = field(8, help="random held-out users, besides the 4 named ones")
    heldout_prompts: int = field(12, help="held-out prompts of the evaluation")
    steps: int = field(400, help="PPD optimisation steps")
    batch_size: int = field(16, help="pairs per step")
    lr: float = field(1e-3, help="AdamW learning rate of the user branch")
    beta: float = field(5000.0, help="DPO beta (Salesforce meaning)")
    user_dropout: float = field(0.1, help="user-embedding dropout")
    sft_weight: float = field(0.0, help="PPD's extra denoising loss on the winners (PPDOptions.sft_weight)")
    error_space: str = field("native", help="PPDOptions.error_space: native (epsilon) or sample (x0 errors; "
                                            "rescale beta, e.g. 2000 -> 100)")
    num_tokens: int = field(4, help="user tokens")
    odd: bool = field(False, help="PPDOptions.odd: a user branch odd in the embedding (opposite choices, opposite "
                                  "change; no change shared by all users)")
    timestep_path: bool = field(False, help="PPDOptions.timestep_path: also shift the UNet's timestep embedding by "
                                            "a projection of the user embedding (a global path)")
    sample_steps: int = field(10, help="sampling steps (pool and evaluation)")
    cfg: float = field(5.0, help="classifier-free guidance")
    seed: int = field(0, help="seed of everything")

    def __post_init__(self) -> None:
        if not self.strengths or any(not 0 < float(strength) for strength in self.strengths):
            raise ValueError(f"strengths must be a non-empty list of positive user-branch scales, got {self.strengths!r}")
        if self.train_embed not in ("pool", "choice"):
            raise ValueError(f"train_embed must be 'pool' or 'choice', got {self.train_embed!r}")
        from .models.diffusion import DiffusionGenerator

        if self.error_space not in DiffusionGenerator.ERROR_SPACES:  # the testbed's SD model
            raise ValueError(f"error_space must be one of {DiffusionGenerator.ERROR_SPACES}, got {self.error_space!r}")
