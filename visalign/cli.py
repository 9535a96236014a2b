"""The ``visalign`` command.

Config-driven commands take ``[CONFIG.yaml] [key=value ...]``: the fields of their config
dataclass, listed with types and defaults by ``--help``.
"""

from __future__ import annotations

import json
import sys

import click

from .config import ConfigError, config_help, load_config


class _Group(click.Group):
    """Subcommands listed in the order they were added."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="visalign")
def main():
    """visalign: align image and video generators with human preferences and rewards."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("visalign").setLevel(logging.INFO)


def config_command(name: str, config_class: type, summary: str, group: click.Group | None = main):
    """A click command whose arguments are ``[CONFIG.yaml] [key=value ...]`` for ``config_class``."""
    epilog = "\b\nConfig fields (set in CONFIG.yaml or as key=value):\n" + "\n".join(
        "  " + line for line in config_help(config_class)
    )

    def decorate(run):
        @click.command(name, help=summary + "\n\nARGS: an optional CONFIG.yaml, then key=value overrides.",
                       epilog=epilog, context_settings={"max_content_width": 120})
        @click.argument("args", nargs=-1)
        def command(args):
            path = None
            overrides = list(args)
            if overrides and "=" not in overrides[0]:
                path = overrides.pop(0)
            try:
                config = load_config(config_class, path, overrides)
            except ConfigError as error:
                raise click.UsageError(str(error)) from None
            run(config)

        if group is not None:
            group.add_command(command)
        return command

    return decorate


# ------------------------------------------------------------------------------------------------


from .quickstart import QuickstartConfig  # noqa: E402


@config_command("quickstart", QuickstartConfig, "The main job: align the testbed model briefly, evaluate before/after.")
def quickstart_command(config: QuickstartConfig):
    from .models import ModelLoadError
    from .quickstart import run_quickstart
    from .training import TrainingError

    try:
        path = run_quickstart(config)
    except (ModelLoadError, ConfigError, TrainingError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"report: {path}")
    click.echo(path.read_text().split("\n\n")[1])


@main.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def info_command(path, as_json):
    """Describe a model folder: family, prediction type, resolution, components and sizes."""
    from .models import ModelLoadError, describe_model

    try:
        info = describe_model(path)
    except ModelLoadError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for key in ("path", "pipeline", "family", "prediction_type", "scheduler", "denoiser", "resolution", "latent_channels"):
        console.print(f"[bold]{key}[/bold]: {info[key]}")
    table = Table("component", "class", "parameters")
    for name, entry in info["components"].items():
        params = entry.get("parameters")
        table.add_row(name, entry["class"], f"{params / 1e6:.2f} M" if params is not None else "-")
    console.print(table)


from .sample import SampleConfig  # noqa: E402


@config_command("sample", SampleConfig, "Generate images from a model and save PNGs and a grid.")
def sample_command(config: SampleConfig):
    from .models import ModelLoadError
    from .sample import run_sample

    try:
        summary = run_sample(config)
    except (ModelLoadError, ConfigError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {summary['images']} images and {summary['grid']}")
    if "steering" in summary:
        click.echo(f"mean reward {summary['mean_reward']:.4f}; diagnostics: {summary['steering']}")


def _dashed_overrides(args: tuple[str, ...]) -> tuple[str, ...]:
    """``--steer fk --particles=4 --adaptive`` → ``steer=fk particles=4 adaptive=true`` (and
    ``key=value`` / a leading CONFIG.yaml unchanged), so ``visalign sample`` takes both styles."""
    converted, items = [], list(args)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            converted.append(item)
        elif "=" in item:
            converted.append(item[2:])
        elif items and not items[0].startswith("--"):
            converted.append(f"{item[2:]}={items.pop(0)}")
        else:
            converted.append(f"{item[2:]}=true")
    return tuple(converted)


sample_command.context_settings["ignore_unknown_options"] = True
_sample_callback = sample_command.callback
sample_command.callback = lambda args: _sample_callback(_dashed_overrides(args))


from .demo import DemoConfig  # noqa: E402


@config_command("demo", DemoConfig, "Personalised generation in the browser (Gradio; pip install 'visalign[demo]').")
def demo_command(config: DemoConfig):
    from .demo import run_demo
    from .models import ModelLoadError

    try:
        run_demo(config)
    except (ModelLoadError, ConfigError) as error:
        raise click.ClickException(str(error)) from None


from .training.config import TrainConfig  # noqa: E402


@config_command("train", TrainConfig, "Fine-tune a model with an objective (sft, dpo, ...) on the one training loop.")
def train_command(config: TrainConfig):
    from .models import ModelLoadError
    from .training import TrainingError, train

    try:
        result = train(config)
    except (ModelLoadError, ConfigError, TrainingError) as error:
        raise click.ClickException(str(error)) from None
    if result.final_weights is None:  # not the main process
        return
    click.echo(f"trained {result.step} steps; weights: {result.final_weights}")
    if result.skipped_records:
        click.echo(f"skipped {result.skipped_records} unusable records (see the log)")


@main.group("testbed", cls=_Group)
def testbed_group():
    """The testbed: a small, fully known text-to-image world (see docs/testbed.md)."""


from .testbed.build import BuildConfig  # noqa: E402


def _testbed_build(config: BuildConfig):
    from .testbed.build import build

    summary = build(config)
    for family, figures in summary["models"].items():
        click.echo(f"{family}: held-out oracle accuracy {figures['heldout_accuracy']:.3f}")
    click.echo(f"build took {summary['timings']['total_s']:.0f} s; wrote {config.out}/build.json")


testbed_group.add_command(
    config_command("build", BuildConfig, "Train the testbed's VAE and base models from scratch (quick=true: a smoke run).",
                   group=None)(_testbed_build)
)


from .eval.cli import EvalConfig  # noqa: E402


@config_command("eval", EvalConfig, "Evaluate a model on the testbed's held-out prompts and write a report.")
def eval_command(config: EvalConfig):
    from .eval.cli import run_eval
    from .models import ModelLoadError

    try:
        path = run_eval(config)
    except (ModelLoadError, ConfigError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {path}")


from .preference_data import PreferenceDataConfig  # noqa: E402


@config_command("preference-data", PreferenceDataConfig,
                "Sample a model, score with a reward, write pairs/rankings/feedback jsonl (on-policy DPO/KTO/RWR data).")
def preference_data_command(config: PreferenceDataConfig):
    from .models import ModelLoadError
    from .preference_data import build_preference_data

    try:
        summary = build_preference_data(config)
    except (ModelLoadError, ConfigError, FileNotFoundError, KeyError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {summary['pairs']} pairs, {summary['prompts']} rankings, "
               f"{summary['feedback']['good'] + summary['feedback']['bad']} feedback labels to {config.out}")


@main.group("dataset", cls=_Group)
def dataset_group():
    """Build training data sets (see docs/data.md)."""


from .synth import SynthConfig  # noqa: E402


def _dataset_synth(config: SynthConfig):
    from .models import ModelLoadError
    from .synth import build_synth

    try:
        summary = build_synth(config)
    except (ModelLoadError, ConfigError, FileNotFoundError, KeyError) as error:
        raise click.ClickException(str(error)) from None
    run = summary["this_run"]
    rate = f", {run['images_per_s']:.2f} images/s" if run["images_per_s"] else ""
    click.echo(f"shard {run['shard']}: {run['images']} new images ({run['prompts_skipped_as_done']} prompts already "
               f"done){rate}; data set: {summary['prompts']} ranked prompts, {summary['images']} images in {config.out}")
    for pair, value in summary.get("reward_agreement", {}).items():
        click.echo(f"  reward agreement {pair}: {value:.3f}")


dataset_group.add_command(
    config_command("synth", SynthConfig, "Syn-Pic: generate with one or several models, score with several rewards, "
                   "write a ranked data set (vote-based phi; resumable, sharded).", group=None)(_dataset_synth)
)


def _add_optional_commands() -> None:
    """Commands of the other packages (rewards, ...) register here when importable."""
    try:
        from rewards.cli import reward_group, score_command
    except ImportError as error:  # an optional extra missing must not break the CLI
        print(f"visalign: reward commands unavailable ({error})", file=sys.stderr)
        return
    main.add_command(score_command, "score")
    main.add_command(reward_group, "reward")


_add_optional_commands()


@main.command("export")
@click.argument("model")
@click.argument("out")
@click.option("--lora", default=None, help="a LoRA (folder or file, as save_lora writes) to merge into the weights")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="dtype of the written weights (default: as loaded, float32)")
@click.option("--config", default=None,
              help="when MODEL is a single file and the hub is out of reach: a diffusers folder of its architecture")
def export_command(model, out, lora, dtype, config):
    """Write MODEL as one original-layout .safetensors checkpoint (AUTOMATIC1111, ComfyUI, Forge).

    MODEL is a diffusers folder (a full fine-tune's OUTPUT_DIR/model), a hub id or a single-file
    checkpoint; a LoRA run's OUTPUT_DIR/lora goes to --lora with its base model as MODEL. OUT
    ends in .safetensors. See docs/models.md.
    """
    from .models import ModelLoadError
    from .models.export import ExportError, export_single_file

    try:
        path = export_single_file(model, out, lora=lora, dtype=dtype, **({"config": config} if config else {}))
    except (ModelLoadError, ExportError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
