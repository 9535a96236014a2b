"""Fixtures for the steering tests: tiny generators of every family, loaded once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory):
    """``tiny_generator(family)`` → a Generator wrapping a tiny random-init diffusers pipeline
    (``sd``, ``sd-v``, ``sdxl``, ``sd3``; built in memory, as a user's pipeline object would be)
    or the toy video generator (``video``), built once per session."""
    from pipelines import as_generator
    from visalign.models.tiny import build_tiny_pipeline

    tokenizer_dir = tmp_path_factory.mktemp("tiny-tokenizer")
    built = {}

    def get(family: str):
        if family not in built:
            if family == "video":
                from steering_toys import ToyVideoGenerator

                built[family] = ToyVideoGenerator()
            else:
                built[family] = as_generator(build_tiny_pipeline(family, seed=0, tokenizer_dir=tokenizer_dir))
        return built[family]

    return get


@pytest.fixture(autouse=True)
def _few_threads():
    # Other work shares this machine's cores; tiny models gain nothing from more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
