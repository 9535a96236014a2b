"""The training run's config: one dataclass tree, from YAML and ``key=value`` overrides."""

from __future__ import annotations

from typing import Any

from ..config import SINGLE_FILE_CONFIG_HELP, configclass, field
from ..models.base import DEFAULT_LORA_TARGETS


@configclass
class LoraConfig:
    rank: int = field(4, help="LoRA rank r")
    alpha: float | None = field(None, help="LoRA alpha (default: rank, i.e. scale 1)")
    dropout: float = field(0.0, help="LoRA dropout")
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), help="module names to adapt")


@configclass
class ModelConfig:
    path: str = field(help="diffusers folder, hub repo id, or single .safetensors file")
    single_file_config: str | None = field(None, help=SINGLE_FILE_CONFIG_HELP)
    family: str | None = field(None, help="sd, sdxl, sd3, modelscope, animatediff or wan (detected when omitted)")
    motion_adapter: str | None = field(None, help="an AnimateDiff motion adapter (folder or hub id) on top of an SD model")
    finetune: str = field("lora", help="lora (adapters; reference = adapters off), full (reference = frozen copy), or "
                                       "motion_modules (AnimateDiff: only the temporal layers; reference = a frozen copy of them; "
                                       "saved as output_dir/motion_adapter)")
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = field("auto", help="dtype of the frozen weights: auto (= mixed precision dtype), float32, float16, bfloat16")
    gradient_checkpointing: bool = field(False, help="recompute denoiser activations in backward")
    train_text_encoder: bool = field(False, help="also train the text encoders (finetune=full, objectives without a "
                                                 "reference, one process, no latent cache)")
    attention: str = field("auto", help="auto, sdpa or xformers")
    reference: str | None = field(None, help="an earlier checkpoint (LoRA or model folder) as the reference policy")


@configclass
class DataConfig:
    format: str = field("captions", help="pickapic, hpdv2, jsonl, parquet or captions")
    path: str | None = field(None, help="data file or folder")
    resolution: int | None = field(None, help="training resolution (default: the model's)")
    random_crop: bool = field(False, help="random instead of centre crop")
    random_flip: bool = field(True, help="random horizontal flip (paired images flipped together)")
    ties: str = field("drop", help="pair data: drop or keep ties")
    num_workers: int = field(0, help="DataLoader worker processes")
    in_memory: bool = field(False, help="decode every image once before training and keep it in memory (small datasets)")
    clips: bool | None = field(None, help="read every image source as a clip (video file, folder of frames); "
                                          "default: true for a video model")
    num_frames: int | None = field(None, help="clips: keep the first num_frames frames (shorter clips are skipped and "
                                              "counted); default: every frame (a batch's clips must then agree)")
    cache_dir: str | None = field(None, help="cache VAE latents and text embeddings here (needs random_crop/flip off)")
    options: dict[str, Any] = field(default_factory=dict, help="extra loader options")


@configclass
class OptimConfig:
    optimizer: str = field("adamw", help="adamw, adafactor or adamw8bit (bitsandbytes)")
    lr: float = field(1e-4, help="peak learning rate")
    scale_lr: bool = field(False, help="multiply lr by batch_size x accumulation x processes")
    weight_decay: float = field(1e-2, help="decoupled weight decay")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], help="Adam betas")
    eps: float = field(1e-8, help="Adam epsilon")
    max_grad_norm: float | None = field(1.0, help="gradient clipping norm (null: off)")
    lr_scheduler: str = field("constant", help="diffusers schedule: constant, constant_with_warmup, linear, cosine, ...")
    warmup_steps: int = field(0, help="warm-up optimisation steps")


@configclass
class EMAConfig:
    enabled: bool = field(False, help="keep an exponential moving average of the trained weights")
    decay: float = field(0.9999, help="EMA decay")
    use_for_final_save: bool = field(True, help="save the EMA weights as the final model")


@configclass
class TrainConfig:
    model: ModelConfig
    objective: str = field("sft", help="objective name (sft, dpo, ...)")
    options: dict[str, Any] = field(default_factory=dict, help="the objective's options (validated by it)")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    batch_size: int = field(4, help="samples per process per micro-batch")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimisation step")
    max_steps: int = field(1000, help="optimisation steps")
    mixed_precision: str = field("no", help="no, fp16 or bf16")
    seed: int = field(0, help="seed of data order, augmentation, noise and timesteps")
    output_dir: str = field("runs/train", help="checkpoints, logs and the final weights")
    checkpoint_every: int = field(500, help="write a checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int | None = field(3, help="keep at most this many checkpoints")
    resume: str | None = field(None, help="'latest' or a checkpoint folder to continue from")
    log_every: int = field(10, help="log metrics every N steps")
    report_to: str = field("none", help="none, tensorboard, wandb or all (accelerate trackers)")
    eval_every: int = field(0, help="run evaluation callbacks every N steps (0: off)")
    on_nan: str = field("error", help="non-finite loss: error (checkpoint, then stop) or skip the step")
    cpu: bool = field(False, help="train on the CPU even when a GPU is present")
