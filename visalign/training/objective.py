"""The Objective seam: what an algorithm gives the trainer.

An objective declares the data it consumes (``data_kinds``: ``"caption"``, ``"pair"``,
``"ranking"``, ``"feedback"``, or empty for objectives that generate their own samples), an
options dataclass with the paper's defaults, and returns ``(loss, metrics)`` for one batch. It
never owns a loop.

Online objectives (PRDP, DDPO, SePPO, DRO) override :meth:`Objective.before_step`, which the
trainer calls before every optimisation step outside autograd, to sample with the current or
an earlier policy (``trainer.generator``, ``trainer.generator.reference()``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..config import ConfigError, configclass, validate


@configclass
class NoOptions:
    pass


class Objective:
    name: ClassVar[str] = ""
    data_kinds: ClassVar[tuple[str, ...]] = ("caption",)
    Options: ClassVar[type] = NoOptions
    # The Generator component the trainer optimises: "denoiser" (LoRA or full, per the config)
    # or another one such as "vae" (full fine-tuning, one process).
    trains: ClassVar[str] = "denoiser"
    # Whether loss() calls generator.reference(): full fine-tuning then keeps a frozen copy.
    needs_reference: ClassVar[bool] = True

    def __init__(self, generator, options=None):
        self.generator = generator
        self.options = options if options is not None else self.Options()

    def setup(self, trainer) -> None:
        """Called once after the trainer has built the generator, optimizer and data."""

    def before_step(self, trainer, step: int) -> None:
        """Called before each optimisation step, outside autograd (online generation goes here)."""

    def loss(self, batch: dict | None, rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one (micro-)batch and float metrics to log.

        ``rng`` is seeded from (run seed, step, micro-batch, rank): draw all noise and timesteps
        from it, so a resumed run repeats the straight run exactly.
        """
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter] | None:
        """Parameters the objective adds and trains itself (PPD's user branch), or ``None``.

        When it returns a list, the trainer optimises exactly these (plus the run's LoRA when
        ``options.train_lora`` is true) and leaves the rest of the model frozen; ``model.finetune``
        must then be ``lora`` (the default), since full fine-tuning would train everything. They
        must be parameters of the trained component (so checkpoints name them) and are saved by
        :meth:`save_trained`.
        """
        return None

    def save_trained(self, directory) -> Any:
        """Write the parameters of :meth:`trainable_parameters` under ``directory`` (the run's
        output folder) at the end of training; returns the path written."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a resume (replay buffers, stat trackers), torch.save-able."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str):
    def decorate(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return decorate


def build_objective(name: str, generator, options: dict | None = None) -> Objective:
    """Look up an objective by name and validate its options (unknown fields named)."""
    import visalign.algorithms  # noqa: F401  (registers the built-in objectives)

    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    parsed = validate(cls.Options, dict(options or {}), source=f"options of objective {name!r}")
    return cls(generator, parsed)
