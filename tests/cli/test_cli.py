"""The ``visalign`` command: info, sample, and config errors before any work."""

import json

from click.testing import CliRunner
from PIL import Image

from visalign.cli import main


def test_help_lists_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("info", "sample"):
        assert name in result.output


def test_info_describes_a_model_folder(tiny_model_dir):
    result = CliRunner().invoke(main, ["info", str(tiny_model_dir("sd-v")), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == "sd" and info["prediction_type"] == "v_prediction"
    assert info["resolution"] == 32 and info["components"]["unet"]["parameters"] > 100_000


def test_info_on_a_folder_that_is_not_a_model(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code != 0 and "no model_index.json" in result.output


def test_sample_writes_pngs_grid_and_metadata(tiny_model_dir, tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text(f"model: {tiny_model_dir('sd3')}\nsteps: 3\nnum_images_per_prompt: 2\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sample", str(config), "prompts=[a red circle, a blue square]", f"out={out}"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert Image.open(out / records[0]["file"]).size == (32, 32)
    assert (out / "grid.png").stat().st_size > 0


def test_sample_rejects_a_misspelt_field_before_loading(tmp_path):
    result = CliRunner().invoke(main, ["sample", f"model={tmp_path}", "prompts=x", "stpes=3"])
    assert result.exit_code == 2
    assert "unknown field 'stpes'" in result.output and "did you mean 'steps'" in result.output


def test_sample_on_a_folder_that_is_not_a_model(tmp_path):
    result = CliRunner().invoke(main, ["sample", f"model={tmp_path}", "prompts=x", f"out={tmp_path / 'o'}"])
    assert result.exit_code == 1 and "no model_index.json" in result.output


def test_sample_reads_a_single_file_offline_with_single_file_config(sd_single_file, tiny_model_dir, tmp_path):
    import numpy as np

    path, config = sd_single_file
    common = ["prompts=a red circle", "steps=2", "num_images_per_prompt=1", "seed=3"]
    result = CliRunner().invoke(main, ["sample", f"model={path}", f"single_file_config={config}", *common,
                                       f"out={tmp_path / 'file'}"])
    assert result.exit_code == 0, result.output
    folder = CliRunner().invoke(main, ["sample", f"model={tiny_model_dir('sd')}", *common, f"out={tmp_path / 'folder'}"])
    assert folder.exit_code == 0, folder.output
    name = json.loads((tmp_path / "file" / "samples.jsonl").read_text().splitlines()[0])["file"]
    from_file, from_folder = (np.asarray(Image.open(tmp_path / out / name), dtype=int) for out in ("file", "folder"))
    assert np.abs(from_file - from_folder).max() <= 1  # the file holds the folder's weights

    # Offline without it: the error names the field (the tiny architecture is nowhere on the hub).
    result = CliRunner().invoke(main, ["sample", f"model={path}", *common, f"out={tmp_path / 'none'}"])
    assert result.exit_code == 1 and "single_file_config=FOLDER" in result.output
    # A folder model carries its own configs: single_file_config with it is a clear error, not a diffusers one.
    result = CliRunner().invoke(main, ["sample", f"model={tiny_model_dir('sd')}", f"single_file_config={config}",
                                       *common, f"out={tmp_path / 'both'}"])
    assert result.exit_code == 1, result.output
    assert "single_file_config/config= applies to single-file checkpoints" in result.output and "is a folder" in result.output
