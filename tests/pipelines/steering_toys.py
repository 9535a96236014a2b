"""Toys for the steering tests: a tiny video-shaped flow generator whose denoiser is exact.

:class:`ToyVideoGenerator` is a real :class:`visalign.models.FlowGenerator` (the same
``sample`` loop, SDE step and hooks as SD3) over latents ``[B, F, C, h, w]`` that decode to
clips ``[B, F, 3, h, w]``. Its data distribution is a Gaussian per prompt,
``x0 ~ N(mu(prompt), sigma0^2 I)``, and its "network" returns the exact velocity
``E[eps - x0 | x_s]`` of that distribution, so sampling is correct by construction and a
steering effect is the steering's, not a model's.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from visalign.models import Cond, FlowGenerator

TEXT_DIM = 8


class ExactGaussianVelocity(nn.Module):
    def __init__(self, shape: tuple[int, ...], sigma0: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.sigma0 = sigma0
        self.means = nn.Linear(TEXT_DIM, int(torch.tensor(shape).prod()))
        with torch.no_grad():
            weights = torch.randn(self.means.weight.shape, generator=torch.Generator().manual_seed(seed))
            self.means.weight.copy_(0.5 * weights)
            self.means.bias.zero_()

    def forward(self, x: Tensor, s: Tensor, prompt_embeds: Tensor) -> Tensor:
        mu = self.means(prompt_embeds[:, 0].float()).view(x.shape[0], *self.shape)
        s = s.float().view(-1, *([1] * (x.dim() - 1)))
        centred = x.float() - (1 - s) * mu
        variance = (1 - s) ** 2 * self.sigma0**2 + s**2
        expected_x0 = mu + (1 - s) * self.sigma0**2 * centred / variance
        expected_noise = s * centred / variance
        return (expected_noise - expected_x0).to(x.dtype)


class SigmoidFrames(nn.Module):
    """The toy "VAE": the first three latent channels through a sigmoid are the RGB frames."""

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, block_out_channels=(1,))

    def forward(self, latents: Tensor) -> Tensor:
        return torch.sigmoid(latents[:, :, :3])


class ToyVideoGenerator(FlowGenerator):
    family = "toy-video"
    denoiser_name = "transformer"

    def __init__(self, frames: int = 3, channels: int = 4, size: int = 4, seed: int = 0) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.frames, self.channels, self.size = frames, channels, size
        pipe = SimpleNamespace(
            transformer=ExactGaussianVelocity((frames, channels, size, size), seed=seed),
            vae=SigmoidFrames(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        )
        super().__init__(pipe)

    def latent_shape(self, batch_size: int, height=None, width=None) -> tuple:
        return (batch_size, self.frames, self.channels, self.size, self.size)

    def encode_prompt(self, prompts) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds = []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:6], "little")
            embeds.append(torch.randn(1, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))
        return Cond(prompt_embeds=torch.stack(embeds).to(self.device))

    def _denoise(self, denoiser, x_t, t, cond):
        return denoiser(x_t, self._timestep_batch(t, x_t.shape[0]), cond.prompt_embeds)

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae(latents)


def brightness(images: Tensor, prompts) -> Tensor:
    """Mean pixel value per image ``[B, 3, H, W]`` (or per clip ``[B, F, 3, H, W]``)."""
    return images.flatten(1).mean(1)


def redness(images: Tensor, prompts) -> Tensor:
    """Red minus the other channels, per image ``[B, 3, H, W]``."""
    return images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1)
