import os

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The efficacy tests measure afresh: no evaluation reports read back from runs/eval-cache
# (benchmarks/efficacy_preference.py), and nothing written into the checkout.
os.environ["VISALIGN_EVAL_CACHE"] = ""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)`` → a folder holding a tiny random-init model of ``family``
    (``"sd"``, ``"sd-v"``, ``"sdxl"``, ``"sd3"``), built once per session with save_pretrained."""
    from visalign.models.tiny import save_tiny_model

    built = {}

    def get(family: str):
        if family not in built:
            built[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def sd_single_file(tiny_model_dir, tmp_path_factory):
    """The tiny sd model as one original-layout .safetensors file (a CivitAI-style SD 1.x fine-tune)
    and a config folder: the model folder without weights, so nothing comes from anywhere but the file."""
    import shutil

    from visalign.models.export import export_single_file

    folder = tmp_path_factory.mktemp("sd-single-file")
    config = folder / "config"
    shutil.copytree(tiny_model_dir("sd"), config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return export_single_file(tiny_model_dir("sd"), folder / "model.safetensors"), config


@pytest.fixture(scope="session")
def benchmark_script():
    """Load a script of ``benchmarks/`` as a module: ``benchmark_script("efficacy_steering")``
    (the efficacy tests run the very code whose figures RESULTS.md records)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
