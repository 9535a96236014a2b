"""Diffusion-DPO (Wallace et al. 2023) and Flow-DPO (Liu et al. 2025, "Improving Video Generation
with Human Feedback"): one loss over the Generator's regression target, so the same code trains
epsilon- and v-prediction diffusion models and rectified-flow models. ALGORITHMS.md §1, §2.1.

Per pair ``(prompt, x^w, x^l)``, with one noise ``eps`` and one timestep ``t`` shared by both
members (:func:`~visalign.algorithms.common.paired_noising`)::

    m_w, m_l = mse(f_theta(x_t^w), target_w), mse(f_theta(x_t^l), target_l)   # one batched forward
    r_w, r_l = the same with the frozen reference, no gradient                  # one batched forward
    z = -(beta / 2) * ((m_w - m_l) - (r_w - r_l))
    loss = -log_sigmoid(z)       (sigmoid, default)
         = relu(1 - z)           (hinge)
         = (z - 1/2)^2           (ipo)

``beta`` has the Salesforce meaning (DiffusionDPO ``--beta_dpo``, default 5000, per-sample mean
MSE). diffusers' ``train_diffusion_dpo.py`` writes ``-log_sigmoid(beta' (d_ref - d_theta))``:
``beta' = beta / 2`` (its 2500 is our 5000). Codebases that sum the MSE over latent elements
instead of averaging use ``beta_sum = beta / (C*H*W)``.

IPO (Azar et al. 2023) regresses the log-ratio margin ``h = d_ref - d_theta`` on ``1/(2 tau)``;
with ``tau = beta'`` (the diffusers branch intends this but refers to an undefined ``args.beta``)
that is ``(h - 1/beta)^2``. We return it multiplied by ``beta'^2``, i.e. ``(z - 1/2)^2``: the same
minimiser, with gradients on the sigmoid loss's scale (which matters for SGD and gradient
clipping, not for Adam).

Flow models: ``beta`` is constant by default (the paper finds the derived schedule
``beta_s = beta (1 - s)^2``, which Diffusion-DPO's epsilon loss implies through
``||eps - eps_hat||^2 = (1-s)^2 ||v - v_hat||^2``, hacks the reward); ``beta_schedule="derived"``
selects it. Flow timesteps come from the Generator's logit-normal training distribution, as in
flow_grpo's DPO script.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from ..models.diffusion import DiffusionGenerator
from ..models.flow import FlowGenerator
from .common import batch_latents, paired_noising, per_sample_mse, prompt_cond, prompt_dropout_mask

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_logits(policy_w: Tensor, policy_l: Tensor, reference_w: Tensor, reference_l: Tensor,
               beta: float | Tensor) -> Tensor:
    """``z = -(beta/2) * ((m_w - m_l) - (r_w - r_l))`` per pair, from per-sample MSEs ``[B]``."""
    return -0.5 * beta * ((policy_w - policy_l) - (reference_w - reference_l))


def dpo_loss_from_logits(z: Tensor, loss_type: str = "sigmoid") -> Tensor:
    """Per-pair loss ``[B]`` from the logits ``z`` of :func:`dpo_logits`."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (z - 0.5) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


# every family's spaces, for options checked without a model
ERROR_SPACES = tuple(dict.fromkeys(DiffusionGenerator.ERROR_SPACES + FlowGenerator.ERROR_SPACES))


def check_error_space(generator, space: str) -> None:
    """``options.error_space`` must be one the generator's family can convert its errors to (any
    family's, when the options are checked without a model)."""
    if generator is None:
        if space not in ERROR_SPACES:
            raise ConfigError(f"options.error_space must be one of {ERROR_SPACES}, got {space!r}")
        return
    if space not in generator.ERROR_SPACES:
        raise ConfigError(f"options.error_space must be one of {generator.ERROR_SPACES} for the "
                          f"{generator.family!r} family, got {space!r}")


def implicit_accuracy(z: Tensor) -> Tensor:
    """Share of pairs the policy ranks right relative to the reference (ties count half, as in diffusers)."""
    return (z > 0).float().mean() + 0.5 * (z == 0).float().mean()


@configclass
class DPOOptions:
    beta: float = field(5000.0, help="KL strength, Salesforce meaning (diffusers' beta x 2); Flow-DPO: 100-500")
    loss_type: str = field("sigmoid", help="sigmoid (DPO), hinge, or ipo")
    beta_schedule: str = field("constant", help="flow models: constant (default) or derived (beta (1-s)^2)")
    sft_weight: float = field(0.0, help="weight of an extra denoising loss on the winners (guards against "
                                        "both likelihoods falling)")
    prompt_dropout: float = field(0.0, help="probability of training a pair with the empty prompt "
                                            "(Salesforce: 0.2 for SD1.5/SDXL)")
    error_space: str = field("native", help="space the denoising errors are compared in: native (the model's "
                                            "own target, as Diffusion-DPO), epsilon, v_prediction, sample (x0; "
                                            "weights the high-noise steps) or flow; rescale beta with it")


def pair_metrics(loss: torch.Tensor, z: torch.Tensor, policy: torch.Tensor,
                 reference: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics every pairwise objective logs: loss, implicit accuracy, mean margin ``z`` and
    the per-member MSEs of ``policy`` (and ``reference``), both ``[pairs, 2]`` (winner, loser)."""
    metrics = {
        "loss": loss.detach().item(),
        "implicit_accuracy": implicit_accuracy(z.detach()).item(),
        "margin": z.detach().mean().item(),
        "mse_winner": policy[:, 0].detach().mean().item(),
        "mse_loser": policy[:, 1].detach().mean().item(),
    }
    if reference is not None:
        metrics["ref_mse_winner"] = reference[:, 0].detach().mean().item()
        metrics["ref_mse_loser"] = reference[:, 1].detach().mean().item()
    return metrics


@register_objective("dpo")
class DiffusionDPO(Objective):
    """Diffusion-DPO / Flow-DPO on pairwise preferences; reference = ``Generator.reference()``."""

    data_kinds = ("pair",)
    Options = DPOOptions
    needs_reference = True

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        if self.options.loss_type not in LOSS_TYPES:
            raise ConfigError(f"options.loss_type must be one of {LOSS_TYPES}, got {self.options.loss_type!r}")
        if self.options.beta_schedule not in ("constant", "derived"):
            raise ConfigError(f"options.beta_schedule must be constant or derived, got {self.options.beta_schedule!r}")
        if self.options.beta_schedule == "derived" and not generator.is_flow:
            raise ConfigError("options.beta_schedule=derived applies to flow models only")
        if self.options.beta <= 0:
            raise ConfigError(f"options.beta must be positive, got {self.options.beta}")
        check_error_space(generator, self.options.error_space)

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        winners, losers = batch_latents(gen, batch, ("winner", "loser"), rng)
        pairs = winners.shape[0]
        drop = prompt_dropout_mask(pairs, self.options.prompt_dropout, rng)
        cond = prompt_cond(gen, batch, drop).repeat_interleave(2)
        # [w0, l0, w1, l1, ...]: one noise and one timestep per pair.
        latents = torch.stack([winners, losers], dim=1).flatten(0, 1)
        x_t, _, t, target = paired_noising(gen, latents, 2, rng)
        weight = gen.error_weight(t, self.options.error_space)
        policy = (per_sample_mse(gen.predict(x_t, t, cond), target) * weight).view(pairs, 2)
        reference = (per_sample_mse(gen.reference().predict(x_t, t, cond), target) * weight).view(pairs, 2)
        beta = self.options.beta
        if self.options.beta_schedule == "derived":
            s = t.view(pairs, 2)[:, 0].float().to(policy.device)
            beta = beta * (1 - s) ** 2
        z = dpo_logits(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta)
        per_pair = dpo_loss_from_logits(z, self.options.loss_type)
        label = batch.get("label")
        if label is not None and bool((label != 1).any()):
            # Soft labels (kept ties: 0.5): the winner is preferred with probability ``label``.
            if self.options.loss_type != "sigmoid":
                raise ValueError(f"pairs with labels other than 1 (ties kept?) need loss_type=sigmoid, "
                                 f"not {self.options.loss_type!r}")
            label = label.to(z)
            per_pair = label * per_pair + (1 - label) * dpo_loss_from_logits(-z, "sigmoid")
        loss = per_pair.mean()
        if self.options.sft_weight:
            loss = loss + self.options.sft_weight * policy[:, 0].mean()
        return loss, pair_metrics(loss, z, policy, reference)
