"""Inference-time sampling on any Generator and any reward: steering, best-of-N, guidance; the demo.

>>> import rewards, torch
>>> from pipelines import FKSteering
>>> steer = FKSteering(generator, rewards.load("testbed-oracle"), num_particles=4)   # or FKSteering.from_pipeline(pipe, ...)
>>> out = steer(["a red circle"], num_inference_steps=20, generator=torch.Generator().manual_seed(0))
>>> out.images, out.rewards, out.diagnostics.ess

See ``docs/steering.md``.
"""

from .best_of_n import BestOfN
from .common import SteeringDiagnostics, SteeringOutput, as_generator
from .guidance import GuidanceOptions, LatentReward, RewardGuidance
from .smc import ParticleWeights, effective_sample_size, log_potential, resample_indices
from .steering import FKOptions, FKSteering

__all__ = [
    "BestOfN",
    "FKOptions",
    "FKSteering",
    "GuidanceOptions",
    "LatentReward",
    "ParticleWeights",
    "RewardGuidance",
    "SteeringDiagnostics",
    "SteeringOutput",
    "as_generator",
    "effective_sample_size",
    "log_potential",
    "resample_indices",
]
