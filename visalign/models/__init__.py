"""The Generator seam: one interface over SD 1.x/2.x, SDXL and SD3-style flow models, and the
text-to-video families ModelScope T2V (``modelscope``), SD + AnimateDiff (``animatediff``) and
Wan 2.1 (``wan``).

>>> from visalign.models import load_generator
>>> generator = load_generator("assets/testbed/sd")          # or a hub id / single file
>>> images = generator.sample(["a red circle"], num_inference_steps=20).images
"""

from .base import Cond, Generator, SampleOutput, StepOutput, StepState, Trajectory, gaussian_log_prob, to_pil
from .diffusion import DiffusionGenerator, StableDiffusionGenerator, StableDiffusionXLGenerator
from .errors import ModelLoadError
from .flow import FlowGenerator, StableDiffusion3Generator
from .loading import describe_model, detect_family, load_generator, parse_dtype
from .video import (
    AnimateDiffGenerator,
    ModelScopeGenerator,
    StableDiffusionVideoGenerator,
    VideoGenerator,
    WanGenerator,
)

# Family name -> Generator class. A new family is one file plus one entry here.
FAMILIES: dict[str, type[Generator]] = {
    "sd": StableDiffusionGenerator,
    "sdxl": StableDiffusionXLGenerator,
    "sd3": StableDiffusion3Generator,
    "modelscope": ModelScopeGenerator,
    "animatediff": AnimateDiffGenerator,
    "wan": WanGenerator,
}


def register_family(name: str, generator_class: type[Generator]) -> None:
    """Register a third-party family (a Generator subclass) under ``name``."""
    FAMILIES[name] = generator_class


__all__ = [
    "AnimateDiffGenerator",
    "Cond",
    "DiffusionGenerator",
    "FAMILIES",
    "FlowGenerator",
    "Generator",
    "ModelLoadError",
    "ModelScopeGenerator",
    "SampleOutput",
    "StableDiffusion3Generator",
    "StableDiffusionGenerator",
    "StableDiffusionVideoGenerator",
    "StableDiffusionXLGenerator",
    "StepOutput",
    "StepState",
    "Trajectory",
    "VideoGenerator",
    "WanGenerator",
    "describe_model",
    "detect_family",
    "gaussian_log_prob",
    "load_generator",
    "parse_dtype",
    "register_family",
    "to_pil",
]
