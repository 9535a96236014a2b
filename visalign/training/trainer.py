"""The one training loop of visalign, on ``accelerate``.

Every objective (SFT, DPO, RankDPO, SePPO, PRDP, reward-gradient methods) runs here; none owns
a loop. The loop gives: LoRA or full fine-tuning, mixed precision, gradient accumulation and
clipping, gradient checkpointing, EMA, AdamW / Adafactor / 8-bit Adam, warm-up schedules,
atomic checkpoints with exact resume, logging with a progress bar and accelerate trackers,
evaluation callbacks, multi-process data-parallel training, and the final save in diffusers
format.

Exact resume: data order is a function of (seed, epoch), augmentations of (seed, epoch, slot),
and each micro-batch's noise and timesteps come from a generator seeded by (seed, step,
micro-batch, rank). With the weights, optimizer, scheduler and EMA restored, a resumed run
repeats the straight run step for step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..config import ConfigError, save_config, to_dict
from .checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from .config import TrainConfig
from .objective import Objective, build_objective
from .sampler import ShardedBatchSampler

logger = logging.getLogger(__name__)

Callback = Callable[["Trainer", int], "dict[str, float] | None"]


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    final_weights: Path | None
    last_metrics: dict[str, float]
    skipped_records: int


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 8_191 + rank) % (2**63 - 1)


class Trainer:
    """Train ``config.objective`` on ``config.model``.

    Args:
        config: the run's :class:`TrainConfig`.
        generator: an already built Generator (else loaded from ``config.model.path``).
        objective: an already built Objective (else built from ``config.objective``/``options``).
        dataset: a :class:`visalign.data.RecordDataset` (else loaded from ``config.data``).
        callbacks: ``fn(trainer, step) -> metrics | None``, run every ``eval_every`` steps and at
            the end, on every process (sample or score on ``trainer.is_main_process`` only).
    """

    def __init__(self, config: TrainConfig, *, generator=None, objective: Objective | None = None, dataset=None,
                 callbacks: Sequence[Callback] = ()):
        if config.on_nan not in ("error", "skip"):
            raise ConfigError(f"on_nan must be 'error' or 'skip', got {config.on_nan!r}")
        if config.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {config.mixed_precision!r}")
        if config.model.finetune not in ("lora", "full", "motion_modules"):
            raise ConfigError(f"model.finetune must be 'lora', 'full' or 'motion_modules', got {config.model.finetune!r}")
        self.config = config
        self.generator = generator
        self.objective = objective
        self.dataset = dataset
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._set_up = False

    # ------------------------------------------------------------------------------ set-up

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def setup(self) -> None:
        if self._set_up:
            return
        from accelerate import Accelerator

        config = self.config
        use_cpu = config.cpu or not torch.cuda.is_available()
        log_with = None if config.report_to == "none" else config.report_to
        self.accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_dir=str(self.output_dir),
        )
        self.device = self.accelerator.device
        from accelerate.utils import DistributedType, set_seed

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Checkpoints and the final save read the trained weights and optimizer state from
            # rank 0, which is right for DDP and wrong for sharded states (a silent partial save).
            raise TrainingError(
                f"{self.accelerator.distributed_type.value} is not supported by the trainer yet: its checkpoints "
                "and final save would hold rank 0's shard only. Use DDP (see docs/scaling.md)."
            )

        set_seed(config.seed)  # LoRA's random init draws from the global RNG
        self._build_generator()
        if self.objective is None:
            self.objective = build_objective(config.objective, self.generator, config.options)
        self._set_up_trainable()
        self._build_data()
        self._build_optimizer()
        self._wrap_for_distribution()
        from visalign.data import SkipCounter

        self.skips = SkipCounter()
        self.ema = None
        if config.ema.enabled:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.parameters, decay=config.ema.decay)
        self.objective.setup(self)
        if self.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            if log_with is not None:
                self.accelerator.init_trackers("visalign", config=_flatten(to_dict(config)))
        self._set_up = True

    def _build_generator(self) -> None:
        config = self.config.model
        if self.generator is None:
            from ..models import load_generator

            self.generator = load_generator(
                config.path, family=config.family, torch_dtype=self._weight_dtype(), device=self.device,
                attention=config.attention, motion_adapter=config.motion_adapter, config=config.single_file_config,
            )
        else:
            self.generator.to(self.device)

    def _set_up_trainable(self) -> None:
        """Make the objective's component trainable: the denoiser (LoRA or full) or, for
        objectives like ``autoencoder``, another component (full)."""
        config = self.config.model
        component = self.objective.trains
        owned = self.objective.trainable_parameters()
        self.trains_lora = False
        self.trains_owned = owned is not None
        if owned is not None:
            parameters = self._set_up_owned(owned)
        elif component == "denoiser":
            if config.finetune == "lora":
                parameters = self._add_lora()
            elif config.finetune == "motion_modules":
                if not hasattr(self.generator, "enable_motion_module_training"):
                    raise ConfigError(
                        f"model.finetune=motion_modules trains an AnimateDiff model's motion modules; this "
                        f"{self.generator.family!r} model has none (give an SD model a motion adapter with "
                        f"model.motion_adapter=..., or use lora / full)")
                parameters = self.generator.enable_motion_module_training(
                    snapshot_reference=self.objective.needs_reference)
            else:
                parameters = self.generator.enable_full_finetuning(snapshot_reference=self.objective.needs_reference)
            if config.gradient_checkpointing:
                self.generator.enable_gradient_checkpointing(denoiser=True, vae=False)
            if config.reference:
                self.generator.set_reference(config.reference)
        else:
            if config.finetune != "full":
                raise ConfigError(f"objective {self.config.objective!r} trains the {component}: set model.finetune=full")
            if self.accelerator.num_processes > 1:
                raise ConfigError(f"objective {self.config.objective!r} runs on one process only")
            self.trained_module.requires_grad_(True).train()
            parameters = list(self.trained_module.parameters())
        chosen = {id(p) for p in parameters}
        named = [(n, p) for n, p in self.trained_module.named_parameters() if id(p) in chosen]
        if len(named) != len(chosen):
            raise TrainingError(f"objective {self.config.objective!r} trains parameters outside the {component}: "
                                "checkpoints could not name them")
        names, parameters = [n for n, _ in named], [p for _, p in named]
        if config.train_text_encoder:
            text_parameters = self._set_up_text_encoder_training()
            parameters = list(parameters) + list(text_parameters.values())
            names += list(text_parameters)
        # Trainable weights in fp32 whatever the frozen weights' dtype (diffusers' cast_training_params).
        for p in parameters:
            p.data = p.data.float()
        self.parameters = parameters
        self.parameter_names = names
        if not parameters:
            raise TrainingError("nothing to train: no parameter requires grad")

    def _add_lora(self) -> list[torch.nn.Parameter]:
        lora = self.config.model.lora
        self.trains_lora = True
        return self.generator.add_lora(lora.rank, lora.alpha, lora.target_modules, lora.dropout)

    def _set_up_owned(self, owned: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The objective's own new parameters (e.g. PPD's user branch), plus LoRA with ``options.train_lora``."""
        config = self.config.model
        if config.finetune != "lora":
            raise ConfigError(f"objective {self.config.objective!r} trains its own new layers and keeps the model "
                              f"frozen; model.finetune={config.finetune!r} would train the whole model: use lora "
                              "(with options.train_lora to add LoRA on the base)")
        if config.train_text_encoder:
            raise ConfigError(f"model.train_text_encoder does not fit objective {self.config.objective!r}, which "
                              "trains only its own layers")
        for p in owned:
            p.requires_grad_(True)
        parameters = list(owned)
        if getattr(self.objective.options, "train_lora", False):
            parameters += self._add_lora()
        if config.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing(denoiser=True, vae=False)
        return parameters

    def _set_up_text_encoder_training(self) -> dict[str, torch.nn.Parameter]:
        """``model.train_text_encoder``: the text encoders train with the denoiser (full fine-tuning)."""
        why = None
        if self.config.model.finetune != "full" or self.objective.trains != "denoiser":
            why = "needs model.finetune=full on a denoiser objective"
        elif self.objective.needs_reference:
            why = (f"does not fit objective {self.config.objective!r}: its reference would see the trained "
                   "text encoders' conditioning")
        elif self.accelerator.num_processes > 1:
            why = "runs on one process only (the text encoders are not wrapped for DDP)"
        elif self.config.data.cache_dir:
            why = "cannot use data.cache_dir (cached text embeddings would go stale)"
        if why:
            raise ConfigError(f"model.train_text_encoder {why}")
        return self.generator.enable_text_encoder_training()

    @property
    def trained_module(self) -> torch.nn.Module:
        return getattr(self.generator, self.objective.trains)

    def _weight_dtype(self) -> torch.dtype:
        from ..models import parse_dtype

        if self.config.model.dtype != "auto":
            return parse_dtype(self.config.model.dtype)
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.mixed_precision, torch.float32)

    def _build_data(self) -> None:
        from torch.utils.data import DataLoader

        from visalign.data import ImageTransform, RecordDataset, collate, load_records

        kinds = self.objective.data_kinds
        self.loader = None
        self.cache = None
        if not kinds:
            return
        config = self.config
        if self.dataset is None:
            if not config.data.path:
                raise ConfigError(f"objective {config.objective!r} needs data ({'/'.join(kinds)}): set data.path")
            options = dict(config.data.options)
            if config.data.format in ("pickapic", "hpdv2", "jsonl", "parquet"):
                options.setdefault("ties", config.data.ties)
            records = load_records(config.data.format, config.data.path, **options)
            transform = ImageTransform(
                resolution=config.data.resolution or self.generator.default_resolution,
                random_crop=config.data.random_crop,
                random_flip=config.data.random_flip,
            )
            clips = config.data.clips if config.data.clips is not None else bool(self.generator.is_video)
            num_frames = config.data.num_frames
            if clips and not self.generator.is_video:
                raise ConfigError("data.clips: true needs a video model; this one makes images")
            if not clips and num_frames is not None:
                raise ConfigError("data.num_frames is for clips: set data.clips: true (or train a video model)")
            self.dataset = RecordDataset(records, transform, seed=config.seed, in_memory=config.data.in_memory,
                                         clips=clips, num_frames=num_frames)
        if self.dataset.kind not in kinds:
            raise ConfigError(
                f"objective {config.objective!r} trains on {'/'.join(kinds)} data, but {config.data.path} holds "
                f"{self.dataset.kind} records"
            )
        if config.data.cache_dir:
            self.cache = self._build_cache(config.data.cache_dir)
        self.sampler = ShardedBatchSampler(
            len(self.dataset), config.batch_size, seed=config.seed,
            rank=self.accelerator.process_index, num_processes=self.accelerator.num_processes,
        )
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=config.data.num_workers,
            generator=torch.Generator().manual_seed(config.seed), persistent_workers=False,
        )

    def _build_cache(self, directory: str):
        """Latents (posterior means) and text embeddings keyed by model, dtype, preprocessing and data."""
        from visalign.data import LatentCache, cache_key

        gen = self.generator
        configs = {"vae": dict(gen.vae.config)}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(gen.pipe, name, None)
            if encoder is not None:
                configs[name] = encoder.config.to_dict()
        key = cache_key(self.dataset, model=self.config.model.path, dtype=gen.dtype, config=configs,
                        extra={"family": gen.family, "encode": "posterior-mean"})
        return LatentCache(directory, key)

    def _encode_cached(self, batch: dict) -> dict:
        from ..models import Cond

        gen = self.generator
        encoded = self.cache.encode(batch, encode_images=lambda images: gen.encode(images, sample=False),
                                    encode_prompts=gen.encode_prompt)
        encoded["cond"] = Cond(**encoded["cond"])
        return encoded

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        optim = self.config.optim
        lr = optim.lr
        if optim.scale_lr:
            lr *= self.config.batch_size * self.config.gradient_accumulation_steps * self.accelerator.num_processes
        if optim.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, betas=tuple(optim.betas),
                                               weight_decay=optim.weight_decay, eps=optim.eps)
        elif optim.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            self.optimizer = Adafactor(self.parameters, lr=lr, relative_step=False, scale_parameter=False,
                                       warmup_init=False, weight_decay=optim.weight_decay)
        elif optim.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
            self.optimizer = bnb.optim.AdamW8bit(self.parameters, lr=lr, betas=tuple(optim.betas),
                                                 weight_decay=optim.weight_decay, eps=optim.eps)
        else:
            raise ConfigError(f"unknown optim.optimizer {optim.optimizer!r}; expected adamw, adafactor or adamw8bit")
        try:
            self.lr_scheduler = get_scheduler(optim.lr_scheduler, self.optimizer, num_warmup_steps=optim.warmup_steps,
                                              num_training_steps=self.config.max_steps)
        except ValueError as error:
            raise ConfigError(f"optim.lr_scheduler: {error}") from None

    def _wrap_for_distribution(self) -> None:
        module = self.trained_module
        wrapped, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        self.wrapped_denoiser = wrapped
        if self.objective.trains == "denoiser":
            self.generator.set_forward_module(wrapped if wrapped is not module else None)

    # ------------------------------------------------------------------------------ data

    def _batches(self) -> Iterator[dict | None]:
        if self.loader is None:
            while True:
                yield None
        while True:
            self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch)
            self.dataset.set_epoch(self.epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                self.skips.update(batch.pop("skipped"))
                batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                if self.cache is not None:
                    batch["cached"] = self._encode_cached(batch)
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.parameter_names, self.parameters))

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main_process:
            optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            states: dict[str, Any] = {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
            }
            if self.ema is not None:
                states["ema"] = self.ema.state_dict()
            if getattr(self.accelerator, "scaler", None) is not None:  # fp16 loss scale
                states["scaler"] = self.accelerator.scaler.state_dict()
            objective_state = self.objective.state_dict()
            if objective_state:
                states["objective"] = objective_state
            trainer_state = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "num_processes": self.accelerator.num_processes,
                "seed": self.config.seed,
                "batch_size": self.config.batch_size,
                "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
                "skips": self.skips.state_dict(),
            }
            path = save_checkpoint(self.checkpoint_dir, self.step, self._trainable_state(), states, trainer_state)
            prune_checkpoints(self.checkpoint_dir, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self) -> None:
        path = resolve_resume(self.config.resume, self.checkpoint_dir)
        if path is None:
            logger.info("resume=latest: no checkpoint in %s, starting from scratch", self.checkpoint_dir)
            return
        weights, states, trainer_state = load_checkpoint(path)
        current = {"num_processes": self.accelerator.num_processes, "seed": self.config.seed,
                   "batch_size": self.config.batch_size,
                   "gradient_accumulation_steps": self.config.gradient_accumulation_steps}
        changed = {k: (trainer_state[k], v) for k, v in current.items() if k in trainer_state and trainer_state[k] != v}
        if changed:
            described = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise TrainingError(f"cannot resume {path} exactly: {described} (they fix the data order and noise)")
        missing = [n for n in self.parameter_names if n not in weights]
        if missing:
            raise TrainingError(f"{path} lacks trained weights {missing[:3]} (was it written with another finetune mode?)")
        with torch.no_grad():
            for name, p in zip(self.parameter_names, self.parameters):
                if weights[name].shape != p.shape:
                    raise TrainingError(f"{path}: weight {name} has shape {tuple(weights[name].shape)}, model has {tuple(p.shape)}")
                p.copy_(weights[name].to(p))
        target = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        target.load_state_dict(states["optimizer"])
        self.lr_scheduler.load_state_dict(states["lr_scheduler"])
        if self.ema is not None:
            if "ema" not in states:
                raise TrainingError(f"{path} has no EMA state but ema.enabled is true")
            self.ema.load_state_dict(states["ema"])
        if "objective" in states:
            self.objective.load_state_dict(states["objective"])
        if "scaler" in states and getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler.load_state_dict(states["scaler"])
        self.step = trainer_state["step"]
        self.epoch = trainer_state["epoch"]
        self.batch_in_epoch = trainer_state["batch_in_epoch"]
        self.skips.load_state_dict(trainer_state["skips"])
        if self.is_main_process:
            _truncate_metrics(self.output_dir / "logs" / "metrics.jsonl", self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        self.setup()
        config = self.config
        if config.resume:
            self._resume()
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=self.step, desc=f"train {config.objective}",
                        disable=not self.is_main_process, dynamic_ncols=True)
        batches = self._batches()
        metrics: dict[str, float] = {}
        window: dict[str, list[float]] = {}
        start_time, start_step = time.perf_counter(), self.step
        while self.step < config.max_steps:
            metrics = self._optimisation_step(batches)
            self.step += 1
            for key, value in metrics.items():
                window.setdefault(key, []).append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                logged = {k: sum(v) / len(v) for k, v in window.items()}
                logged.update(lr=self.lr_scheduler.get_last_lr()[0], skipped_records=self._total_skips(),
                              steps_per_second=(self.step - start_step) / max(time.perf_counter() - start_time, 1e-9))
                self.log(logged)
                window = {}
            if config.eval_every and self.step % config.eval_every == 0:
                self._run_callbacks()
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
        progress.close()
        if self.cache is not None:
            self.cache.flush()
        self.save_checkpoint()
        if self.callbacks and not (config.eval_every and self.step % config.eval_every == 0):
            self._run_callbacks()
        final = self.save_final()
        skipped = self._total_skips()
        if skipped and self.is_main_process:
            logger.warning("skipped %d unusable records: %s", skipped, self.skips.summary())
        self.accelerator.end_training()
        return TrainResult(self.step, self.output_dir, final, metrics, skipped)

    def _optimisation_step(self, batches: Iterator[dict | None]) -> dict[str, float]:
        config = self.config
        accumulation = config.gradient_accumulation_steps
        with torch.no_grad():
            self.objective.before_step(self, self.step)
        sums: dict[str, float] = {}
        finite = True
        for micro in range(accumulation):
            batch = next(batches)
            rng = torch.Generator().manual_seed(_step_seed(config.seed, self.step, micro, self.accelerator.process_index))
            last = micro == accumulation - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped_denoiser)
            with sync:
                with self.accelerator.autocast():
                    loss, metrics = self.objective.loss(batch, rng)
                finite = self._all_finite(loss)
                if not finite:
                    break
                self.accelerator.backward(loss / accumulation)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) / accumulation
        if not finite:
            result = self._non_finite(loss)
            self.lr_scheduler.step()  # a skipped step still advances the schedule
            return result
        grad_norm = None
        if config.optim.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.parameters, config.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.parameters)
        if grad_norm is not None:
            sums["grad_norm"] = float(grad_norm)
        return self._mean_over_processes(sums)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.tensor(float(torch.isfinite(loss.detach()).all()), device=self.device)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        return bool(finite.item() == 1.0)

    def _non_finite(self, loss: torch.Tensor) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.on_nan == "skip":
            logger.warning("non-finite loss at step %d: step skipped (no update)", self.step)
            return {"nan_skipped": 1.0}
        path = self.save_checkpoint()
        raise TrainingError(
            f"the {self.config.objective!r} loss is {loss.detach().float().item()} at step {self.step}; the last good "
            f"weights are saved in {path or self.checkpoint_dir}. Lower optim.lr, check the data, or set on_nan=skip."
        )

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], device=self.device, dtype=torch.float64)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _total_skips(self) -> int:
        count = torch.tensor(float(self.skips.num_records), device=self.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return int(count.item())

    def _run_callbacks(self) -> None:
        for callback in self.callbacks:
            result = callback(self, self.step)
            if result:
                self.log({f"eval/{k}": v for k, v in result.items()})

    def log(self, metrics: dict[str, float]) -> None:
        """Log to the console, ``logs/metrics.jsonl`` and the accelerate trackers (main process)."""
        if not self.is_main_process:
            return
        record = {"step": self.step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        path = self.output_dir / "logs" / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.config.report_to != "none":
            self.accelerator.log(metrics, step=self.step)
        logger.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

    # ------------------------------------------------------------------------------ final save

    def save_final(self) -> Path | None:
        """LoRA → ``output_dir/lora`` (``pipe.load_lora_weights`` reads it); full → ``output_dir/model``;
        motion modules → ``output_dir/motion_adapter`` (a ``MotionAdapter`` folder);
        an objective's own layers → wherever its ``save_trained`` writes (PPD:
        ``output_dir/user_branch.safetensors``; its path is returned, LoRA also saved when trained)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main_process:
            use_ema = self.ema is not None and self.config.ema.use_for_final_save
            if use_ema:
                self.ema.store(self.parameters)
                self.ema.copy_to(self.parameters)
            try:
                if self.trains_owned:
                    path = self.objective.save_trained(self.output_dir)
                if self.trains_lora:
                    lora_path = self.generator.save_lora(self.output_dir / "lora")
                    path = path or lora_path
                elif self.config.model.finetune == "motion_modules":  # (own layers need finetune=lora)
                    path = self.generator.save_motion_adapter(self.output_dir / "motion_adapter")
                elif not self.trains_owned:
                    path = self.generator.save_pretrained(self.output_dir / "model")
            finally:
                if use_ema:
                    self.ema.restore(self.parameters)
        self.accelerator.wait_for_everyone()
        return path


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (the run died after logging them)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Build a :class:`Trainer` and run it."""
    return Trainer(config, **kwargs).train()
