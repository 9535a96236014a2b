"""Alignment algorithms: one file per method, each a pure loss plus a small objective class.

Importing this package registers every objective with the trainer (``objective: NAME``).
"""

from . import autoencoder, ddpo, dpo, dro, grpo, instructvideo, kto, ppd, prdp, raft, rankdpo, reward_grad, rwr, seppo, sft  # noqa: F401  (register their objectives)
from .common import batch_cond, denoising_loss, paired_noising, per_sample_mse

__all__ = ["batch_cond", "denoising_loss", "paired_noising", "per_sample_mse"]
