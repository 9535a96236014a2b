"""RankDPO (Karthik et al. 2024, "Scalable Ranked Preference Optimization for Text-to-Image
Generation", arXiv 2410.18013, Algorithm 2, Eqs. 5-7; ALGORITHMS.md §3.2): Diffusion-DPO over
the ``k`` ranked images of a prompt, each pair weighted by a DCG-style gain x discount.

Per prompt ``c`` with images ``x_1..x_k`` and preference scores ``phi_1..phi_k`` (Syn-Pic's vote
fraction, :mod:`visalign.synth`; higher is better), one noise ``eps`` and one timestep ``t``
shared by all ``k`` images (:func:`~visalign.algorithms.common.paired_noising`)::

    s_i     = mse(f_theta(x_t^i), target_i) - mse(f_ref(x_t^i), target_i)    lower: better than ref
    tau(i)  = 1-based rank of image i: by s ascending, no gradient ("scores", default, LambdaLoss
              style: the paper's figure ranks by the current model), or by phi descending ("labels")
    D(r)    = log2(1 + r)
    Delta_ij = |2^phi_i - 2^phi_j| * |1/D(tau(i)) - 1/D(tau(j))|
    z_ij    = -(beta / 2) * (s_i - s_j)                      Diffusion-DPO's logit (dpo.dpo_logits)
    loss(c) = sum over pairs with phi_i > phi_j of Delta_ij * -log_sigmoid(z_ij)

averaged over prompts. ``beta`` has Diffusion-DPO's Salesforce meaning, so with ``k = 2``,
``phi = (1, 0)`` and a unit weight the loss *is* the Diffusion-DPO loss (the paper's beta was not
recovered: start from Diffusion-DPO's). ``normalize="weights"`` divides each prompt's sum by its
sum of weights (a choice the paper leaves open: the loss scale then no longer grows with ``k``
or the score spread; with it, ``k = 2`` reduces to DPO exactly whatever the weight).

Deviations / choices, all options: ``weighting="uniform"`` (every ordered pair weight 1: DPO on
all pairs of the ranking with shared noise, an ablation); ``loss_type`` hinge/ipo as in DPO.
Ties in ``phi`` contribute nothing (the gain is 0 and the pair is not ordered); ranks use a
stable sort. The reference pass runs in chunks of ``reference_chunk_size`` images (no gradient,
so chunking only bounds activation memory as ``k`` grows).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_latents, paired_noising, per_sample_mse, prompt_cond, prompt_dropout_mask
from .dpo import LOSS_TYPES, dpo_logits, dpo_loss_from_logits, implicit_accuracy

RANK_SOURCES = ("scores", "labels")
WEIGHTINGS = ("dcg", "uniform")
NORMALIZE = ("none", "weights")


def rank_positions(keys: Tensor, mask: Tensor | None = None) -> Tensor:
    """1-based rank of each entry when sorted by ``keys`` ascending (stable), per row ``[B, K]``.

    Entries outside ``mask`` rank after every real entry. Computed without gradient.
    """
    keys = keys.detach().float()
    if mask is not None:
        keys = keys.masked_fill(~mask, math.inf)
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, keys.shape[1] + 1, device=keys.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def dcg_pair_weights(phi: Tensor, ranks: Tensor) -> Tensor:
    """``Delta_ij = |2^phi_i - 2^phi_j| * |1/log2(1+tau_i) - 1/log2(1+tau_j)|`` → ``[B, K, K]``
    (symmetric, zero diagonal, no gradient)."""
    gain = torch.pow(2.0, phi.detach().float())
    discount = 1.0 / torch.log2(1.0 + ranks.float())
    return (gain[:, :, None] - gain[:, None, :]).abs() * (discount[:, :, None] - discount[:, None, :]).abs()


def rankdpo_loss(
    policy_mse: Tensor,
    reference_mse: Tensor,
    phi: Tensor,
    beta: float,
    mask: Tensor | None = None,
    rank_source: str = "scores",
    weighting: str = "dcg",
    normalize: str = "none",
    loss_type: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The RankDPO loss per prompt ``[B]`` from per-image MSEs ``[B, K]``.

    Args:
        policy_mse, reference_mse: per-image MSE of the policy / reference ``[B, K]``.
        phi: preference scores ``[B, K]``, higher is better.
        mask: ``[B, K]`` real images (rankings with fewer than ``K``); default all.
    Returns:
        ``(loss [B], parts)`` with ``parts``: ``z`` ``[B, K, K]`` (logit of "i beats j"),
        ``weights`` ``[B, K, K]`` (zero off the ordered pairs), ``pairs`` (bool ``[B, K, K]``:
        ``phi_i > phi_j``, both real), ``ranks`` ``[B, K]``.
    """
    if rank_source not in RANK_SOURCES:
        raise ValueError(f"rank_source must be one of {RANK_SOURCES}, got {rank_source!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if mask is None:
        mask = torch.ones_like(phi, dtype=torch.bool)
    mask = mask.to(policy_mse.device)
    phi = phi.to(policy_mse.device).float()
    score = policy_mse - reference_mse  # s_i
    # No gradient through the ranks: they come from detached scores (or labels).
    ranks = rank_positions(score if rank_source == "scores" else -phi, mask)
    pairs = (phi[:, :, None] > phi[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    if weighting == "dcg":
        weights = dcg_pair_weights(phi, ranks) * pairs
    else:
        weights = pairs.float()
    z = dpo_logits(policy_mse[:, :, None], policy_mse[:, None, :], reference_mse[:, :, None],
                   reference_mse[:, None, :], beta)
    per_pair = torch.where(pairs, dpo_loss_from_logits(z, loss_type), torch.zeros_like(z))
    loss = (weights * per_pair).flatten(1).sum(dim=1)
    if normalize == "weights":
        loss = loss / weights.flatten(1).sum(dim=1).clamp_min(1e-12)
    return loss, {"z": z, "weights": weights, "pairs": pairs, "ranks": ranks}


@configclass
class RankDPOOptions:
    beta: float = field(5000.0, help="KL strength, Diffusion-DPO's Salesforce meaning (the paper's is unknown)")
    rank_source: str = field("scores", help="ranks for the DCG discount: scores (current model, the paper's "
                                            "figure; LambdaLoss) or labels (phi)")
    weighting: str = field("dcg", help="dcg (the paper) or uniform (every ordered pair weight 1; an ablation)")
    normalize: str = field("none", help="none (sum over pairs, the paper) or weights (divide by the sum of "
                                        "each prompt's pair weights)")
    loss_type: str = field("sigmoid", help="sigmoid (the paper), hinge or ipo, as in Diffusion-DPO")
    reference_chunk_size: int = field(0, help="images per reference forward (0: all in one call); bounds "
                                              "memory as k grows")
    prompt_dropout: float = field(0.0, help="probability of training a prompt's ranking with the empty prompt")
    sft_weight: float = field(0.0, help="weight of an extra denoising loss on each ranking's best image (not in "
                                        "the paper; Diffusion-DPO's guard against every likelihood falling)")


@register_objective("rankdpo")
class RankDPO(Objective):
    """RankDPO on ranked image sets (``ranking`` records; scores = phi, higher better)."""

    data_kinds = ("ranking",)
    Options = RankDPOOptions
    needs_reference = True

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        choices = {"rank_source": RANK_SOURCES, "weighting": WEIGHTINGS, "normalize": NORMALIZE,
                   "loss_type": LOSS_TYPES}
        for name, allowed in choices.items():
            if getattr(self.options, name) not in allowed:
                raise ConfigError(f"options.{name} must be one of {allowed}, got {getattr(self.options, name)!r}")
        if self.options.beta <= 0:
            raise ConfigError(f"options.beta must be positive, got {self.options.beta}")
        if self.options.reference_chunk_size < 0:
            raise ConfigError(f"options.reference_chunk_size must be >= 0, got {self.options.reference_chunk_size}")

    def _latents(self, batch: dict, rng: torch.Generator) -> Tensor:
        """``[B * K, C, h, w]`` latents, zeros in the padded slots (only real images are encoded)."""
        mask = batch["mask"]
        cached = batch.get("cached")
        if cached is not None:
            return cached["images"].flatten(0, 1)
        (real,) = batch_latents(self.generator, {"images": batch["images"][mask]}, ("images",), rng)
        latents = real.new_zeros((mask.numel(), *real.shape[1:]))
        latents[mask.flatten().to(real.device)] = real
        return latents

    def _reference_mse(self, x_t: Tensor, t: Tensor, cond, target: Tensor) -> Tensor:
        reference = self.generator.reference()
        size = self.options.reference_chunk_size or len(x_t)
        return torch.cat([
            per_sample_mse(reference.predict(x_t[i : i + size], t[i : i + size], cond[i : i + size]),
                           target[i : i + size])
            for i in range(0, len(x_t), size)
        ])

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        mask = batch["mask"].to(torch.bool)
        prompts, k = mask.shape
        latents = self._latents(batch, rng)
        drop = prompt_dropout_mask(prompts, self.options.prompt_dropout, rng)
        real = mask.flatten().to(latents.device)
        cond = prompt_cond(gen, batch, drop).repeat_interleave(k)[real.to(gen.device)]
        # One noise and one timestep per prompt, shared by its k images; only real images run.
        x_t, _, t, target = paired_noising(gen, latents, k, rng)
        x_t, t, target = x_t[real], t[real.to(t.device)], target[real]
        policy_real = per_sample_mse(gen.predict(x_t, t, cond), target)
        reference_real = self._reference_mse(x_t, t, cond, target)
        policy = policy_real.new_zeros(prompts * k).masked_scatter(real.to(policy_real.device), policy_real)
        reference = reference_real.new_zeros(prompts * k).masked_scatter(real.to(policy_real.device), reference_real)
        options = self.options
        per_prompt, parts = rankdpo_loss(
            policy.view(prompts, k), reference.view(prompts, k), batch["scores"], options.beta, mask,
            options.rank_source, options.weighting, options.normalize, options.loss_type,
        )
        loss = per_prompt.mean()
        if options.sft_weight:
            # The best image by label (phi) of each ranking; the first such slot on ties, never a pad.
            phi = batch["scores"].to(policy.device).float().masked_fill(~mask.to(policy.device), float("-inf"))
            best = policy.view(prompts, k).gather(1, phi.argmax(dim=1, keepdim=True)).squeeze(1)
            loss = loss + options.sft_weight * best.mean()
        pairs = parts["pairs"]
        z = parts["z"].detach()[pairs]
        metrics = {
            "loss": loss.detach().item(),
            "pair_accuracy": implicit_accuracy(z).item() if z.numel() else 0.5,
            "margin": z.mean().item() if z.numel() else 0.0,
            "pairs_per_prompt": pairs.sum().item() / prompts,
            "weight_sum": parts["weights"].sum().item() / prompts,
            "mse": policy_real.detach().mean().item(),
            "ref_mse": reference_real.mean().item(),
        }
        return loss, metrics
