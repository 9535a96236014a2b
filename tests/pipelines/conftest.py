"""Fixtures for the steering tests: tiny generators of every family, loaded once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    """``tiny_generator(family)`` → a Generator of a tiny random-init model (``sd``, ``sd-v``,
    ``sdxl``, ``sd3``) or the toy video generator (``video``), built once per session."""
    from visalign.models import load_generator

    loaded = {}

    def get(family: str):
        if family not in loaded:
            if family == "video":
                from steering_toys import ToyVideoGenerator

                loaded[family] = ToyVideoGenerator()
            else:
                loaded[family] = load_generator(tiny_model_dir(family))
        return loaded[family]

    return get


@pytest.fixture(autouse=True)
def _few_threads():
    # Other work shares this machine's cores; tiny models gain nothing from more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
