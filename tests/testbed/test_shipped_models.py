"""The shipped testbed base models: load offline in plain diffusers, and reach the figures that
assets/testbed/build.json documents (full check under -m slow)."""

import json
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "testbed"
BUILD = json.loads((ASSETS / "build.json").read_text())
PIPELINES = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}


@pytest.mark.parametrize("family", sorted(BUILD["shipped"]))
def test_shipped_model_loads_offline_in_plain_diffusers_and_samples(family):
    import diffusers

    # SD3 without T5 loads as diffusers documents it: text_encoder_3=None, tokenizer_3=None.
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(ASSETS / family, torch_dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=4, guidance_scale=4.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(BUILD["shipped"]))
def test_shipped_model_reaches_its_documented_heldout_accuracy(family):
    from visalign.eval import evaluate
    from visalign.models import load_generator
    from visalign.testbed.prompts import load_prompts

    documented = BUILD["models"][family]["heldout_accuracy"]
    prompts = [record.prompt for record in load_prompts("heldout")]
    images_per_prompt = BUILD["models"][family].get("eval_images_per_prompt", 2)
    report = evaluate(load_generator(ASSETS / family), prompts, images_per_prompt=images_per_prompt, num_inference_steps=20,
                      guidance_scale=4.0, seed=0, keep_images=False)
    # Same seeds as the build's evaluation; the tolerance covers float differences across machines.
    assert abs(report.accuracy - documented) <= 0.03
