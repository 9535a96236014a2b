"""The example configs in assets/configs/: every file loads with its dataclass (unknown fields fail),
the tiny ones train here, and the accelerate files are valid for ``accelerate launch``."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import write_captions

from visalign.config import load_config
from visalign.personal import TestbedPPDConfig as PersonalConfig  # not named Test*: pytest would collect it
from visalign.training import TrainConfig, build_objective, list_checkpoints, train

CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "configs"
ACCELERATE = CONFIGS / "accelerate"

# Which dataclass reads the YAML files of a folder under assets/configs/ ("" = the top level).
# A new kind of config goes in its own folder and gets an entry here.
CONFIG_CLASSES = {"": TrainConfig, "personal": PersonalConfig}

EXAMPLES = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
TINY = [p for p in EXAMPLES if p.name.startswith("tiny_")]
REAL = {  # file -> (model.path, family, resolution, mixed_precision, objective, finetune, data format)
    "sd15_sft_lora.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "fp16", "sft", "lora", "pickapic"),
    "sdxl_sft_lora.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, "bf16", "sft", "lora", "pickapic"),
    "sd3_sft_lora.yaml": ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 1024, "bf16", "sft", "lora", "pickapic"),
    "sd15_dpo.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "fp16", "dpo", "full", "pickapic"),
    "sd15_dpo_lora.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "fp16", "dpo", "lora", "pickapic"),
    "sdxl_dpo.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, "bf16", "dpo", "full", "pickapic"),
    "sd3_flow_dpo.yaml": ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 1024, "bf16", "dpo", "lora", "jsonl"),
    "sd15_kto.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "fp16", "kto", "full", "pickapic"),
    "sd15_seppo.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "fp16", "seppo", "full", "pickapic"),
    "sd15_dro.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "bf16", "dro", "full", "captions"),
    "sdxl_rankdpo.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, "bf16", "rankdpo", "full", "parquet"),
    "sd3_rankdpo.yaml": ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 1024, "bf16", "rankdpo", "lora", "parquet"),
}


def _config_class(path: Path):
    folder = path.parent.relative_to(CONFIGS).as_posix()
    folder = "" if folder == "." else folder
    assert folder in CONFIG_CLASSES, f"{path}: no dataclass registered for assets/configs/{folder}/ in CONFIG_CLASSES"
    return CONFIG_CLASSES[folder]


def test_the_examples_are_there():
    names = {p.name for p in EXAMPLES}
    assert set(REAL) <= names and "tiny_sft.yaml" in names
    assert {p.name for p in ACCELERATE.glob("*.yaml")} >= {
        "ddp_multi_gpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "cpu_2proc.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_example_config_loads_strictly(path):
    from visalign.data.loaders import LOADERS

    cls = _config_class(path)
    config = load_config(cls, path)  # unknown or misspelt fields raise ConfigError
    if cls is not TrainConfig:
        return
    build_objective(config.objective, None, config.options)  # the objective's options, strictly too
    assert config.data.format in LOADERS
    accepted = inspect.signature(LOADERS[config.data.format]).parameters
    unknown = set(config.data.options) - set(accepted)
    assert not unknown, f"data.options {sorted(unknown)} are not options of the {config.data.format} loader"
    assert config.mixed_precision in ("no", "fp16", "bf16")
    assert config.model.finetune in ("lora", "full")
    if config.data.cache_dir:  # the cache refuses random augmentations
        assert not (config.data.random_crop or config.data.random_flip)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_configs_name_the_published_checkpoints(name):
    config = load_config(TrainConfig, CONFIGS / name)
    model_path, family, resolution, precision, objective, finetune, data_format = REAL[name]
    assert (config.model.path, config.model.family) == (model_path, family)
    assert config.data.resolution == resolution and config.mixed_precision == precision
    assert config.data.format == data_format and config.model.gradient_checkpointing
    assert config.model.finetune == finetune and config.objective == objective


# Published defaults of the preference recipes (ALGORITHMS.md sections 1, 2.1, 14).
PUBLISHED = {
    "sd15_dpo.yaml": {"beta": 5000.0, "lr": 1e-8, "scale_lr": True, "optimizer": "adamw", "warmup": 500, "accum": 128},
    "sdxl_dpo.yaml": {"beta": 5000.0, "lr": 1e-8, "scale_lr": True, "optimizer": "adafactor", "warmup": 200, "accum": 128},
    "sd3_flow_dpo.yaml": {"beta": 100.0, "lr": 3e-4, "scale_lr": False, "optimizer": "adamw", "rank": 32, "alpha": 64},
    "sd15_kto.yaml": {"beta": 1000.0, "lr": 1e-7, "scale_lr": False, "optimizer": "adamw", "warmup": 200},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preference_recipes_carry_the_published_defaults(name):
    config = load_config(TrainConfig, CONFIGS / name)
    expected = PUBLISHED[name]
    assert config.options["beta"] == expected["beta"]
    assert (config.optim.lr, config.optim.scale_lr, config.optim.optimizer) == (
        expected["lr"], expected["scale_lr"], expected["optimizer"])
    if "warmup" in expected:
        assert config.optim.warmup_steps == expected["warmup"]
    if "accum" in expected:
        assert config.batch_size * config.gradient_accumulation_steps == expected["accum"]
    if "rank" in expected:
        assert (config.model.lora.rank, config.model.lora.alpha) == (expected["rank"], expected["alpha"])


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.name)
def test_tiny_config_trains_here(path, tiny_model_dir, tmp_path):
    family = load_config(TrainConfig, path).model.path.rsplit("tiny-", 1)[-1]
    data = write_captions(tmp_path / "data", 16)
    config = load_config(TrainConfig, path, overrides=[
        f"model.path={tiny_model_dir(family)}", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}", "max_steps=2", "checkpoint_every=1", "gradient_accumulation_steps=1",
    ])
    result = train(config)
    assert result.step == 2 and result.final_weights == tmp_path / "run" / "lora"
    assert (result.final_weights / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("name,dpo", [("sdxl_rankdpo.yaml", "sdxl_dpo.yaml"), ("sd3_rankdpo.yaml", "sd3_flow_dpo.yaml"),
                                      ("testbed_rankdpo.yaml", None)])
def test_rankdpo_recipes_read_synth_rankings_with_the_dpo_beta_of_their_family(name, dpo):
    # RankDPO's own beta and optimiser were not recovered (ALGORITHMS.md section 3): the recipes
    # take the Diffusion-DPO / Flow-DPO ones, whose beta has the same meaning.
    config = load_config(TrainConfig, CONFIGS / name)
    assert config.objective == "rankdpo" and config.data.format == "parquet"
    assert config.data.options == {"drop_flat": True}
    assert config.options["rank_source"] == "scores" and config.options["weighting"] == "dcg"
    if dpo is not None:
        reference = load_config(TrainConfig, CONFIGS / dpo)
        assert config.options["beta"] == reference.options["beta"]
        assert (config.optim.optimizer, config.optim.lr, config.optim.scale_lr) == (
            reference.optim.optimizer, reference.optim.lr, reference.optim.scale_lr)


# Winners-only recipes (ALGORITHMS.md sections 4 and 10): SePPO's pool (K = 7, every 30 updates,
# random replay, batch 2048) and DiffusionDRO's official defaults.
WINNERS_ONLY = {
    "sd15_seppo.yaml": {"options": {"reference_strategy": "random", "pool_size": 7, "save_every": 30, "flipper": "sign"},
                        "batch": 2048 // 8, "lr": 1e-8},
    "sd15_dro.yaml": {"options": {"margin": 1e-3, "refresh_every": 16, "buffer_batches": 4, "num_inference_steps": 20,
                                  "guidance_scale": 1.0, "prompt_dropout": 0.2},
                      "batch": 4 * 16, "lr": 1e-4, "max_steps": 25600, "ema": True},
}


@pytest.mark.parametrize("name", sorted(WINNERS_ONLY))
def test_winners_only_recipes_carry_the_published_defaults(name):
    config = load_config(TrainConfig, CONFIGS / name)
    expected = WINNERS_ONLY[name]
    assert {k: config.options[k] for k in expected["options"]} == expected["options"]
    assert config.batch_size * config.gradient_accumulation_steps == expected["batch"]
    assert config.optim.lr == expected["lr"] and config.optim.max_grad_norm == 1.0
    if "max_steps" in expected:
        assert config.max_steps == expected["max_steps"] and config.ema.enabled == expected["ema"]


# Online reward fine-tuning (issue 11; ALGORITHMS.md sections 5, 7): file -> (model, objective, options checked)
ONLINE = {
    "sd15_ddpo.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "ddpo", {
        "num_inference_steps": 50, "guidance_scale": 5.0, "eta": 1.0, "clip_range": 1e-4, "adv_clip": 5.0,
        "stat_min_count": 16, "rewards": {"aesthetic": 1.0}, "prompts": "assets/prompts/simple_animals.txt"}),
    "sd15_prdp.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "prdp", {
        "num_inference_steps": 50, "guidance_scale": 5.0, "eta": 1.0, "group_size": 8,
        "rewards": {"pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}}),
    "sd3_grpo.yaml": ("stabilityai/stable-diffusion-3-medium-diffusers", "grpo", {
        "num_inference_steps": 10, "guidance_scale": 4.5, "eta": 0.7, "group_size": 24, "clip_range": 1e-4,
        "timestep_fraction": 0.99, "rewards": {"pickscore": 1.0}}),
    "testbed_prdp.yaml": ("assets/testbed/sd", "prdp", {"rewards": {"testbed-reward": 1.0}}),
    "testbed_ddpo.yaml": ("assets/testbed/sd", "ddpo", {"rewards": {"testbed-reward": 1.0}}),
}


@pytest.mark.parametrize("name", sorted(ONLINE))
def test_online_recipes_carry_the_published_defaults(name):
    config = load_config(TrainConfig, CONFIGS / name)
    model, objective, options = ONLINE[name]
    assert (config.model.path, config.objective, config.model.finetune) == (model, objective, "lora")
    assert {k: config.options[k] for k in options} == options
    if name.startswith("sd"):
        assert (config.optim.lr, config.optim.weight_decay, config.optim.max_grad_norm) == (3e-4, 1e-4, 1.0)
    prompts = config.options["prompts"]
    if prompts.startswith("assets/"):
        assert (CONFIGS.parents[1] / prompts).is_file()
    if name == "sd3_grpo.yaml":
        assert (config.model.lora.rank, config.model.lora.alpha) == (32, 64)


# ------------------------------------------------------------------------------------------------
# accelerate config files


def _launch_argument_names() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


EXPECTED_DISTRIBUTION = {
    "ddp_multi_gpu.yaml": "MULTI_GPU", "cpu_2proc.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("path", sorted(ACCELERATE.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_loads_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # unknown top-level keys raise ValueError
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == EXPECTED_DISTRIBUTION[path.name]
    assert config.num_processes >= 2 and config.num_machines == 1
    # accelerate launch copies nested keys onto its own arguments (fsdp_config.x -> --fsdp_x) and
    # silently ignores ones it does not know: check them against `accelerate launch`'s arguments.
    known = _launch_argument_names()
    for name, section in (("fsdp_config", config.fsdp_config), ("deepspeed_config", config.deepspeed_config)):
        for key in section or {}:
            argument = key if name != "fsdp_config" or key.startswith("fsdp") else "fsdp_" + key
            assert argument in known, f"{path.name}: {name}.{key} is not an accelerate launch option"


def test_cpu_config_is_the_one_that_starts_two_processes():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / "cpu_2proc.yaml"))
    # MULTI_CPU in a config file starts ONE local process (ENVIRONMENT.md); MULTI_GPU + CPU does not.
    assert config.use_cpu and config.num_processes == 2


def test_fsdp_config_keeps_original_parameters_for_lora():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ACCELERATE / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_use_orig_params"] is True


def test_deepspeed_config_names_a_valid_json_with_a_fixed_micro_batch():
    from accelerate.commands.config.config_args import load_config_from_file

    section = load_config_from_file(str(ACCELERATE / "deepspeed_zero2.yaml")).deepspeed_config
    repository = CONFIGS.parents[1]
    settings = json.loads((repository / section["deepspeed_config_file"]).read_text())
    assert settings["zero_optimization"]["stage"] == 2
    # The trainer does not prepare its DataLoader, so "auto" cannot be filled in; and it accumulates
    # by itself, which DeepSpeed's per-backward step does not support (docs/scaling.md).
    assert isinstance(settings["train_micro_batch_size_per_gpu"], int)
    assert settings["gradient_accumulation_steps"] == 1
    # With a deepspeed_config_file, accelerate refuses these keys in the YAML.
    assert not {"zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device"} & set(section)


@pytest.mark.slow
def test_cpu_2proc_launch_trains_on_two_processes(tiny_model_dir, tmp_path):
    """``accelerate launch --config_file cpu_2proc.yaml -m visalign.cli train tiny_sft.yaml`` is DDP."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    data = write_captions(tmp_path / "data", 16)
    command = [accelerate, "launch", "--config_file", str(ACCELERATE / "cpu_2proc.yaml"), "--main_process_port", "29533",
               "-m", "visalign.cli", "train", str(CONFIGS / "tiny_sft.yaml"), f"model.path={tiny_model_dir('sd')}",
               f"data.path={data}", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
               "max_steps=2", "batch_size=2", "gradient_accumulation_steps=1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert completed.returncode == 0, completed.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 2
