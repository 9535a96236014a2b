"""Building blocks shared by the algorithms (ALGORITHMS.md §0), unit-tested once.

- :func:`per_sample_mse`: the mean over non-batch dimensions (never the sum: that changes the
  effective beta by C*H*W).
- :func:`paired_noising`: one noise tensor and one timestep per group of images of a prompt,
  applied to every member (DPO, RankDPO, SePPO, Flow-DPO, PPD).
- :func:`batch_cond`: prompt conditioning of a data batch, with SDXL micro-conditioning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import Cond, Generator


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """``(prediction - target)^2`` averaged over all non-batch dimensions, in fp32 → ``[B]``."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def denoising_loss(generator: Generator, latents: Tensor, cond: Cond, rng: torch.Generator | None = None) -> Tensor:
    """The family's regression loss per sample ``[B]``: noise ``latents`` at training timesteps and
    regress the denoiser's output on :meth:`Generator.target` (noise, v, or velocity)."""
    noise = torch.randn(latents.shape, generator=rng, device=rng.device if rng is not None else None).to(latents)
    t = generator.sample_timesteps(latents.shape[0], generator=rng)
    prediction = generator.predict(generator.add_noise(latents, noise, t), t, cond)
    return per_sample_mse(prediction, generator.target(latents, noise, t))


def paired_noising(
    generator: Generator, latents: Tensor, group_size: int, rng: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noise groups of ``group_size`` consecutive latents with shared noise and timestep.

    Args:
        latents: ``[B * group_size, C, h, w]``, members of a group adjacent
            (``[g0m0, g0m1, ..., g1m0, ...]``).
    Returns:
        ``(x_t, noise, t, target)``, each with the batch of ``latents``.
    """
    if latents.shape[0] % group_size:
        raise ValueError(f"{latents.shape[0]} latents do not split into groups of {group_size}")
    groups = latents.shape[0] // group_size
    noise = torch.randn((groups, *latents.shape[1:]), generator=rng, device=rng.device if rng else None)
    noise = noise.to(device=latents.device, dtype=latents.dtype).repeat_interleave(group_size, dim=0)
    t = generator.sample_timesteps(groups, generator=rng).repeat_interleave(group_size, dim=0)
    return generator.add_noise(latents, noise, t), noise, t, generator.target(latents, noise, t)


def batch_cond(generator: Generator, batch: dict, prompts: list[str] | None = None, height: int | None = None,
               width: int | None = None) -> Cond:
    """Encode a batch's prompts with its size/crop conditioning (no gradient unless the text
    encoders are being trained)."""
    prompts = batch["prompts"] if prompts is None else prompts
    cond = generator.encode_prompt(prompts)
    if height is not None and width is not None:
        cond = generator.micro_conditioning(
            cond, batch.get("original_sizes"), batch.get("crop_top_lefts"), height, width
        )
    return cond


def batch_latents(generator: Generator, batch: dict, keys: tuple[str, ...], rng: torch.Generator | None = None
                  ) -> list[Tensor]:
    """Latents of the batch's image tensors ``keys`` (e.g. ``("winner", "loser")``): from the
    trainer's latent cache when present, else VAE-encoded in **one** call (posterior samples,
    as the reference scripts do)."""
    cached = batch.get("cached")
    if cached is not None:
        return [cached[key] for key in keys]
    images = torch.cat([batch[key] for key in keys]).to(generator.device)
    with torch.no_grad():
        latents = generator.encode(images, generator=rng)
    return list(latents.chunk(len(keys)))


def prompt_cond(generator: Generator, batch: dict, drop: Tensor | None = None) -> Cond:
    """The batch's conditioning, from the cache when present; rows where ``drop`` is true get
    the empty prompt (prompt dropout, which trains the unconditional branch CFG needs)."""
    cached = batch.get("cached")
    reference = batch["winner"] if "winner" in batch else batch["images"]
    height, width = reference.shape[-2], reference.shape[-1]
    if cached is not None:
        cond = cached["cond"]
        if drop is not None and drop.any():
            cond = replace_rows(cond, generator.negative_cond(len(cond)), drop)
        return generator.micro_conditioning(cond, batch.get("original_sizes"), batch.get("crop_top_lefts"),
                                            height, width)
    prompts = list(batch["prompts"])
    if drop is not None:
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    return batch_cond(generator, batch, prompts, height, width)


def replace_rows(cond: Cond, other: Cond, mask: Tensor) -> Cond:
    """``cond`` with the rows where ``mask`` is true taken from ``other`` (same batch size)."""
    import dataclasses

    values = {}
    for item in dataclasses.fields(cond):
        mine, theirs = getattr(cond, item.name), getattr(other, item.name)
        if mine is None:
            values[item.name] = None
            continue
        rows = mask.to(mine.device).reshape(-1, *([1] * (mine.dim() - 1)))
        values[item.name] = torch.where(rows, theirs.to(mine), mine)
    return type(cond)(**values)


def prompt_dropout_mask(batch_size: int, probability: float, rng: torch.Generator | None) -> Tensor | None:
    """Which samples train with the empty prompt (``None`` when ``probability`` is 0)."""
    if probability <= 0:
        return None
    return torch.rand(batch_size, generator=rng, device=rng.device if rng is not None else None) < probability
