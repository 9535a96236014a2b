"""Single-file checkpoints: export to the original (A1111 / ComfyUI) layout and load back.

Every round trip goes through diffusers' own single-file converters, which were written
against the released checkpoints, so a file they read back exactly has the original key
layout. The tiny models' configs are not SD's, so loading is given a config folder: a copy of
the tiny model folder without its weights (nothing can come from anywhere but the file).
"""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from visalign.models import (
    ModelLoadError,
    StableDiffusion3Generator,
    StableDiffusionGenerator,
    StableDiffusionXLGenerator,
    load_generator,
)
from visalign.models.export import ExportError, export_single_file, unet_to_original, vae_to_original
from visalign.models.loading import infer_single_file_family

PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}


def _config_folder(model_dir, tmp_path):
    """The model folder's configs, tokenizers and scheduler without any weights."""
    folder = tmp_path / "config"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def _build_wide(family, path):
    """A tiny ``sdxl``/``sd3`` model whose second text encoder is 48 wide, not 32.

    diffusers' single-file loader tells the text encoders apart by width (real SDXL/SD3: 768
    and 1280), so the fixture's two 32-wide encoders cannot round-trip. SD3's CLIP-L has no
    projection in the original layout (readers use the identity), so it is set to the identity.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from visalign.models.tiny import PIPELINE_CLASSES, build_tiny_components

    components = build_tiny_components(family, seed=0, tokenizer_dir=path / "tokenizer")
    torch.manual_seed(1)
    config = components["text_encoder_2"].config.to_dict()
    config.update(hidden_size=48)
    components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    if family == "sdxl":
        components["unet"] = diffusers.UNet2DConditionModel.from_config({**components["unet"].config, "cross_attention_dim": 80})
    else:
        components["transformer"] = diffusers.SD3Transformer2DModel.from_config(
            {**components["transformer"].config, "joint_attention_dim": 80}
        )
        with torch.no_grad():
            components["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    getattr(diffusers, PIPELINE_CLASSES[family])(**components).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def round_trip_model_dir(tiny_model_dir, tmp_path_factory):
    """``round_trip_model_dir(name)``: the tiny fixture for ``sd``/``sd-v``, the wide variant for ``sdxl``/``sd3``."""
    built = {}

    def get(name):
        if name in ("sd", "sd-v"):
            return tiny_model_dir(name)
        if name not in built:
            built[name] = _build_wide(name, tmp_path_factory.mktemp(f"wide-{name}"))
        return built[name]

    return get


def _modules(generator):
    return {"denoiser": generator.denoiser, "vae": generator.vae, **generator.text_encoders}


def _assert_same_weights(expected, actual, atol=0.0):
    assert expected.keys() == actual.keys()
    for name in expected:
        want, got = expected[name].state_dict(), actual[name].state_dict()
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.allclose(want[key].float(), got[key].float(), atol=atol, rtol=0), f"{name}.{key}"


def _images(generator):
    return generator.sample(["a red circle"], num_inference_steps=3, guidance_scale=4.0,
                            generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", ["sd", "sd-v", "sdxl", "sd3"])
def test_export_loads_back_with_the_same_weights_and_images(name, round_trip_model_dir, tmp_path):
    import diffusers

    folder = round_trip_model_dir(name)
    config = _config_folder(folder, tmp_path)
    original = load_generator(folder)
    path = original.save_single_file(tmp_path / "model.safetensors")

    family = {"sd-v": "sd"}.get(name, name)
    assert infer_single_file_family(path) == family
    loaded = load_generator(path, config=config)  # family inferred from the keys
    assert loaded.family == family and loaded.prediction_type == original.prediction_type
    _assert_same_weights(_modules(original), _modules(loaded))
    # Exporting the loaded file again (a CivitAI file in, a merged file out) gives the same tensors.
    first, again = load_file(str(path)), load_file(str(export_single_file(loaded, tmp_path / "again.safetensors")))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    ours = _images(original)
    # SD3 as diffusers loads it differs by float32 round-off (~1e-6) from memory alignment: cloning
    # its loaded weights makes the images identical.
    assert torch.allclose(ours, _images(loaded), atol=1e-5, rtol=0)

    # Plain diffusers reads the same file. SD3 saved without T5: its from_single_file needs the
    # absent components passed as None (visalign's loader does that from the config folder).
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = getattr(diffusers, PIPELINES[family]).from_single_file(str(path), config=str(config), **absent)
    for component in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original.pipe, component, None) is not None:
            want, got = getattr(original.pipe, component).state_dict(), getattr(pipe, component).state_dict()
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), component
    if name == "sd":  # and the image: visalign samples with DDIM, as the DDIM-scheduled pipeline does
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(["a red circle"], num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                      output_type="pt", generator=torch.Generator().manual_seed(0)).images
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_lora_is_merged_into_the_export(tiny_model_dir, tmp_path):
    generator = load_generator(tiny_model_dir("sd"))
    generator.add_lora(rank=4)
    with torch.no_grad():  # a trained adapter: the up-projections are no longer zero
        for name, parameter in generator.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    config = _config_folder(tiny_model_dir("sd"), tmp_path)

    merged = load_generator(generator.save_pretrained(tmp_path / "merged"))  # fuse_lora's merge
    exported = load_generator(generator.save_single_file(tmp_path / "a.safetensors"), config=config)
    assert generator.has_adapters() and not exported.has_adapters()
    _assert_same_weights(_modules(merged), _modules(exported), atol=1e-6)
    assert torch.allclose(_images(generator), _images(exported), atol=2e-3, rtol=0)

    # The same from the base folder and the saved adapter (`visalign export BASE OUT --lora DIR`).
    generator.save_lora(tmp_path / "lora")
    path = export_single_file(tiny_model_dir("sd"), tmp_path / "b.safetensors", lora=tmp_path / "lora")
    _assert_same_weights(_modules(exported), _modules(load_generator(path, config=config)), atol=1e-6)


def test_dtype_and_metadata(tiny_model_dir, tmp_path):
    path = export_single_file(tiny_model_dir("sd-v"), tmp_path / "model.safetensors", dtype="fp16")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"F16"}
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["visalign.prediction_type"] == "v_prediction"
    loaded = load_generator(path, config=_config_folder(tiny_model_dir("sd-v"), tmp_path), torch_dtype="fp16")
    assert loaded.dtype == torch.float16 and loaded.prediction_type == "v_prediction"


def test_real_sized_architectures_get_the_released_key_layout():
    """Key names a strict loader (A1111, ComfyUI) needs, on an SD 1.5-sized UNet and VAE built on
    the meta device: the released v1-5 checkpoint has 686 UNet and 248 VAE tensors."""
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # the SD 1.5 UNet's config
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    keys = unet_to_original(unet.state_dict(), unet.config)
    assert len(keys) == 686
    for key in ("input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "middle_block.1.proj_in.weight",
                "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.11.0.skip_connection.weight", "time_embed.2.weight", "out.2.weight"):
        assert key in keys, key
    vae_keys = vae_to_original(vae.state_dict(), vae.config)
    assert len(vae_keys) == 248
    assert vae_keys["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)  # 1x1 convs in LDM
    assert vae_keys["decoder.up.3.block.0.conv1.weight"].shape[0] == 512  # LDM numbers up blocks from the bottom
    assert "encoder.down.0.block.1.nin_shortcut.weight" not in vae_keys and "encoder.down.1.block.0.nin_shortcut.weight" in vae_keys


def test_equally_wide_text_encoders_are_refused_not_mixed_up(tiny_model_dir, tmp_path):
    # The fixture's SDXL has two 32-wide text encoders, which diffusers' loader cannot tell apart.
    path = export_single_file(tiny_model_dir("sdxl"), tmp_path / "sdxl.safetensors")
    assert infer_single_file_family(path) == "sdxl"
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        load_generator(path, config=_config_folder(tiny_model_dir("sdxl"), tmp_path))
    # The fixture's SD3 CLIP-L has a random projection, which the SD3 layout cannot store.
    with pytest.raises(ExportError, match="text_projection that is not the identity"):
        export_single_file(tiny_model_dir("sd3"), tmp_path / "sd3.safetensors")


def test_bad_files_get_errors_that_name_the_problem(tiny_model_dir, tmp_path):
    good = export_single_file(tiny_model_dir("sd"), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file .*truncated"):
        load_generator(truncated)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        StableDiffusionGenerator.from_single_file(truncated)  # family given: checked all the same

    unet = load_generator(tiny_model_dir("sd")).denoiser
    diffusers_layout = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(diffusers_layout))
    with pytest.raises(ModelLoadError, match="diffusers layout"):
        load_generator(diffusers_layout)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ModelLoadError, match="looks like a LoRA file"):
        load_generator(lora)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"weights.0": torch.zeros(2), "weights.1": torch.zeros(2)}, str(unknown))
    with pytest.raises(ModelLoadError, match="no denoiser weights under 'model.diffusion_model.'.*'weights.0'"):
        load_generator(unknown)

    with pytest.raises(ModelLoadError, match="could not fetch one from the hub.*pass config="):
        load_generator(good)  # the tests are offline and the tiny model's config is nowhere on the hub

    with pytest.raises(ModelLoadError, match="holds a 'sd' checkpoint, not 'sdxl'"):
        StableDiffusionXLGenerator.from_single_file(good)
    with pytest.raises(ModelLoadError, match="holds a 'sd' checkpoint, not 'sd3'"):
        StableDiffusion3Generator.from_single_file(good)



def test_config_is_for_single_files_and_must_be_a_folder(tiny_model_dir, sd_single_file, tmp_path):
    path, config = sd_single_file
    # from_pretrained would take config= as a pipeline keyword: refused up front, naming the path.
    with pytest.raises(ModelLoadError, match="applies to single-file checkpoints; .*tiny-sd.* is a folder"):
        load_generator(tiny_model_dir("sd"), config=config)
    with pytest.raises(ModelLoadError, match="owner/model is a hub repo id or a missing path, not a file"):
        load_generator("owner/model", config=config)
    with pytest.raises(ModelLoadError, match="single-file checkpoint .*missing.safetensors does not exist"):
        load_generator(tmp_path / "missing.safetensors", config=config)
    # a mistyped folder, the checkpoint itself, relative paths that cannot be hub ids
    for wrong in (tmp_path / "no-such-folder", path, "../no-such-folder", "./cfg", "configs/sd/v1"):
        with pytest.raises(ModelLoadError, match="config .* is not a folder; expected a local diffusers folder"):
            load_generator(path, config=wrong)
    with pytest.raises(ModelLoadError, match="config 'no-such-folder' is not a local folder and could not be fetched"):
        load_generator(path, config="no-such-folder")  # read as a hub id: offline, it cannot be

def test_cli_export(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from visalign.cli import main

    generator = load_generator(tiny_model_dir("sd"))
    generator.add_lora(rank=4)
    generator.save_lora(tmp_path / "lora")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(main, ["export", str(tiny_model_dir("sd")), str(out), "--lora", str(tmp_path / "lora"),
                                       "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert infer_single_file_family(out) == "sd"

    result = CliRunner().invoke(main, ["export", str(tmp_path / "missing"), str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "Error:" in result.output
    result = CliRunner().invoke(main, ["export", str(tiny_model_dir("sd")), str(tmp_path / "x.ckpt")])
    assert result.exit_code == 1 and "must end in .safetensors" in result.output
