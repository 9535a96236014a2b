"""The particle bookkeeping of Feynman-Kac steering: potentials, weights, ESS and resampling.

Pure tensor code, independent of any model, so every property is checkable on a toy chain.
Everything is ``[P, k]``: ``P`` independent groups (one per prompt) of ``k`` particles.
Weights live in log space throughout (``exp(lambda * r)`` overflows fp32 at ``lambda = 10``
for rewards above ~9, and ImageReward-style rewards are negative); normalisation and ESS use
``logsumexp``. Nothing is clamped: a non-finite reward gives its particle zero weight and is
counted, never silently mapped to a number.

Potentials (Singhal et al. 2025, §3; ALGORITHMS.md §8). With ``r_i`` the reward at the i-th
evaluation and ``r_prev`` the particle's stored value:

- ``max``: ``rt = max(r_i, r_prev)``, ``log G = lambda * rt``;
- ``add``: ``rt = r_i + r_prev`` (a running sum along the path), ``log G = lambda * rt``;
- ``diff``: ``log G = lambda * (r_i - r_prev)``, which telescopes to ``lambda * r(x0)``;
- ``immediate``: ``log G = lambda * r_i``.

At the final evaluation every potential is replaced by ``lambda * r(x0) - log Pi``, where
``Pi`` is the product of the potentials already applied along the particle's path, so the
product of everything applied along a surviving path is exactly ``exp(lambda * r(x0))`` and
the particles target ``p(x0) exp(lambda * r(x0))``. (The reference code applies this
correction to ``max``/``add``/``immediate`` only; for ``diff`` it coincides whenever every
potential was applied, and applying it always keeps the target exact under adaptive
resampling too.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

POTENTIALS = ("max", "add", "diff", "immediate")
WEIGHTINGS = ("incremental", "accumulated")
RESAMPLING = ("multinomial", "systematic")


def initial_reward(potential: str) -> float:
    """``r_prev`` before the first evaluation: ``-inf`` for ``max`` (0 would silently clamp
    negative rewards, a pitfall of the reference code), 0 for the others."""
    return -math.inf if potential == "max" else 0.0


def log_potential(potential: str, lmbda: float, rewards: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
    """``(log G, running)`` for rewards ``[P, k]`` and stored values ``previous`` ``[P, k]``.

    ``running`` is the value to store as the next ``r_prev`` (the running max or sum for
    ``max``/``add``, the reward itself otherwise).
    """
    if potential == "max":
        running = torch.maximum(rewards, previous)
        return lmbda * running, running
    if potential == "add":
        running = rewards + previous
        return lmbda * running, running
    if potential == "diff":
        return lmbda * (rewards - previous), rewards
    if potential == "immediate":
        return lmbda * rewards, rewards
    raise ValueError(f"unknown potential {potential!r}; expected one of {POTENTIALS}")


def log_normalize(log_weights: Tensor) -> Tensor:
    """Normalised log-weights per group (rows of ``[P, k]``)."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """``1 / sum(w_hat^2)`` per group, from unnormalised log-weights ``[P, k]`` → ``[P]``.

    Computed as ``exp(2 lse(lw) - lse(2 lw))``, so it is exact at any scale of the weights.
    """
    return torch.exp(2 * torch.logsumexp(log_weights, dim=-1) - torch.logsumexp(2 * log_weights, dim=-1))


def resample_indices(log_weights: Tensor, method: str = "multinomial", generator: torch.Generator | None = None) -> Tensor:
    """Draw ``k`` ancestor indices per group from normalised weights: ``[P, k]`` → ``[P, k]`` long.

    Indices are local to the group (``0..k-1``), so resampling never mixes prompts.
    ``multinomial`` (the reference code's choice) draws i.i.d. with replacement;
    ``systematic`` uses one uniform per group and has lower variance.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    probs = torch.softmax(log_weights.detach().double().to(device), dim=-1)
    groups, k = probs.shape
    if method == "multinomial":
        return torch.multinomial(probs, k, replacement=True, generator=generator)
    if method == "systematic":
        positions = (torch.rand(groups, 1, generator=generator, device=device, dtype=torch.float64)
                     + torch.arange(k, device=device, dtype=torch.float64)) / k
        cdf = probs.cumsum(dim=-1)
        cdf[:, -1] = 1.0
        return torch.searchsorted(cdf, positions, right=True).clamp(max=k - 1)
    raise ValueError(f"unknown resampling method {method!r}; expected one of {RESAMPLING}")


@dataclass
class Update:
    """What one reward evaluation did.

    ``ancestors`` ``[P, k]`` (local indices; the identity where a group was not resampled),
    ``resampled`` ``[P]`` (the weights were applied and a resampling step taken),
    ``ess`` ``[P]`` of the weights the decision used, ``log_weights`` ``[P, k]`` those weights
    (normalised per group), ``log_potentials`` ``[P, k]`` the potentials computed,
    ``invalid`` the number of non-finite rewards.
    """

    ancestors: Tensor
    resampled: Tensor
    ess: Tensor
    log_weights: Tensor
    log_potentials: Tensor
    invalid: int


class ParticleWeights:
    """Per-particle state of FK steering for ``num_groups`` groups of ``num_particles``.

    Attributes (all ``[P, k]``, on ``device``):
        previous: ``r_prev``, the stored reward value the potentials compare against.
        log_path: log of the product of potentials applied along each particle's path (``Pi``).
        log_carry: log-weight carried since the last resampling: proposal corrections
            (``log p/q`` of a guided proposal) and, in ``accumulated`` mode, the potentials of
            evaluations that did not resample.

    ``weighting="incremental"`` (the paper's, and the default) decides each resampling with the
    current potential only and drops the potential of an evaluation that does not resample;
    ``"accumulated"`` is textbook SMC: weights multiply until a resampling resets them
    (Fk-Diffusion-Steering issue #12 discusses the two).
    """

    def __init__(
        self,
        num_groups: int,
        num_particles: int,
        potential: str = "diff",
        lmbda: float = 10.0,
        weighting: str = "incremental",
        resampling: str = "multinomial",
        ess_threshold: float = 0.5,
        device: torch.device | str = "cpu",
    ) -> None:
        if potential not in POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}; expected one of {POTENTIALS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if resampling not in RESAMPLING:
            raise ValueError(f"unknown resampling method {resampling!r}; expected one of {RESAMPLING}")
        if num_groups < 1 or num_particles < 1:
            raise ValueError(f"need at least one group and one particle, got {num_groups} x {num_particles}")
        if not math.isfinite(lmbda) or lmbda < 0:
            raise ValueError(f"lmbda must be a finite number >= 0, got {lmbda}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold is a fraction of the particles in [0, 1], got {ess_threshold}")
        self.potential = potential
        self.lmbda = float(lmbda)
        self.weighting = weighting
        self.resampling = resampling
        self.ess_threshold = ess_threshold
        shape = (num_groups, num_particles)
        self.previous = torch.full(shape, initial_reward(potential), dtype=torch.float64, device=device)
        self.log_path = torch.zeros(shape, dtype=torch.float64, device=device)
        self.log_carry = torch.zeros(shape, dtype=torch.float64, device=device)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.previous.shape)

    def add_log_weight(self, log_weight: Tensor) -> None:
        """Multiply each particle's weight by ``exp(log_weight)`` ``[P, k]`` (e.g. ``log p/q``)."""
        self.log_carry = self.log_carry + log_weight.detach().to(self.log_carry)

    def update(self, rewards: Tensor, *, final: bool = False, adaptive: bool = False,
               generator: torch.Generator | None = None) -> Update:
        """Apply one reward evaluation ``rewards`` ``[P, k]`` and resample where due.

        ``final``: the evaluation of the finished samples ``r(x0)``: the corrected potential,
        and every group is resampled. ``adaptive``: resample only the groups whose ESS is below
        ``ess_threshold * k``; otherwise every group is resampled.
        """
        if rewards.shape != self.previous.shape:
            raise ValueError(f"rewards have shape {tuple(rewards.shape)}, expected {self.shape} (prompts x particles)")
        rewards = rewards.detach().to(self.previous)
        valid = torch.isfinite(rewards)
        invalid = int((~valid).sum())
        safe = torch.where(valid, rewards, torch.zeros_like(rewards))
        log_g, running = log_potential(self.potential, self.lmbda, safe, self.previous)
        if final:
            log_g = self.lmbda * safe - self.log_path
        log_g = torch.where(valid, log_g, torch.full_like(log_g, -math.inf))
        running = torch.where(valid, running, self.previous)

        log_weights = self.log_carry + log_g
        dead = torch.isneginf(log_weights).all(dim=-1)
        if bool(dead.any()):
            warnings.warn(
                f"{int(dead.sum())} prompt group(s) have no particle with a finite weight (non-finite rewards); "
                "their particles are kept with uniform weights", RuntimeWarning, stacklevel=3,
            )
            log_weights = torch.where(dead[:, None], torch.zeros_like(log_weights), log_weights)
            log_g = torch.where(dead[:, None], torch.zeros_like(log_g), log_g)
        ess = effective_sample_size(log_weights)
        k = log_weights.shape[-1]
        if final or not adaptive:
            resample = torch.ones_like(dead)
        else:
            resample = ess < self.ess_threshold * k

        identity = torch.arange(k, device=log_weights.device).expand_as(log_weights)
        # A group with exactly uniform weights keeps its particles: the identity is a valid
        # draw, and skipping the random one means lambda = 0 reproduces plain sampling exactly.
        uniform = (log_weights.amax(dim=-1) - log_weights.amin(dim=-1)) == 0
        draw = resample & ~uniform
        ancestors = identity.clone()
        if bool(draw.any()):
            drawn = resample_indices(log_weights[draw], self.resampling, generator).to(ancestors.device)
            ancestors[draw] = drawn

        gathered = lambda values: values.gather(-1, ancestors)  # noqa: E731
        keep = resample[:, None]
        applied = keep if self.weighting == "incremental" else torch.ones_like(keep)
        self.log_path = gathered(torch.where(applied, self.log_path + log_g, self.log_path))
        self.log_carry = torch.where(keep, torch.zeros_like(self.log_carry),
                                     self.log_carry + (log_g if self.weighting == "accumulated" else 0.0))
        self.previous = gathered(running)
        return Update(
            ancestors=ancestors,
            resampled=resample,
            ess=ess,
            log_weights=log_normalize(log_weights),
            log_potentials=log_g,
            invalid=invalid,
        )
