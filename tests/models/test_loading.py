"""Loading: family detection, clear errors, the offline CLIP tokenizer."""

import json

import pytest
import torch

from visalign.models import (
    ModelLoadError,
    StableDiffusion3Generator,
    StableDiffusionXLGenerator,
    load_generator,
)
from visalign.models.tokenizer import build_clip_tokenizer


def test_offline_tokenizer_matches_openai_clip_ids_and_reloads(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert len(tokenizer) == 49408


def test_a_compact_clip_tokenizer_keeps_clips_first_ids_and_splits_rarer_words(tmp_path):
    from transformers import CLIPTokenizer

    from visalign.models.tokenizer import clip_vocab_size

    build_clip_tokenizer(tmp_path, num_merges=1000)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    full = CLIPTokenizer.from_pretrained(_full_tokenizer(tmp_path.parent / "full"))
    assert len(tokenizer) == clip_vocab_size(1000) == 1514
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1512, 1513)  # the last two ids
    # Words whose CLIP ids lie below 512 + 1000 keep them; rarer ones split into several pieces.
    for word in ("a", "red", "and", "of"):
        assert tokenizer(word, add_special_tokens=False).input_ids == full(word, add_special_tokens=False).input_ids
    circle = tokenizer("circle", add_special_tokens=False).input_ids
    assert len(circle) > 1 and max(circle) < 1512
    text = "a zebra-striped circle!"  # no word is out of vocabulary: it decodes as the full tokenizer's does
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == full.decode(full(text).input_ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="num_merges"):
        build_clip_tokenizer(tmp_path / "bad", num_merges=-1)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_every_text_encoder_reads_eos_where_its_tokenizer_puts_it_at_every_size(family, tmp_path):
    from visalign.models.tiny import build_tiny_components

    parts = build_tiny_components(family, tokenizer_dir=tmp_path, size="testbed-wide")
    eos = parts["tokenizer"].eos_token_id
    assert eos == len(parts["tokenizer"]) - 1 == 8191
    for name in ("text_encoder", "text_encoder_2"):
        if parts.get(name) is not None:
            assert parts[name].config.eos_token_id == eos and parts[name].config.vocab_size == eos + 1, name


def _full_tokenizer(path):
    build_clip_tokenizer(path)
    return path


def test_folder_without_model_index_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_generator(tmp_path)


def test_unsupported_pipeline_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match="KandinskyPipeline"):
        load_generator(tmp_path)


def test_family_mismatch_is_an_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="holds a 'sd' model, not 'sdxl'"):
        StableDiffusionXLGenerator.from_pretrained(tiny_model_dir("sd"))
    with pytest.raises(ModelLoadError, match="family='sd3'"):
        load_generator(tiny_model_dir("sd"), family="sd3")


def test_detects_each_family_and_loads_in_a_dtype(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd3"), torch_dtype="bfloat16")
    assert isinstance(gen, StableDiffusion3Generator) and gen.dtype == torch.bfloat16
    out = gen.sample(["a red circle"], num_inference_steps=2, output_type="latent")
    assert out.latents.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_generator(tiny_model_dir("sd"), torch_dtype="float8")


def test_single_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        StableDiffusionXLGenerator.from_single_file(path)


def test_xformers_attention_needs_cuda(tiny_model_dir):
    gen = load_generator(tiny_model_dir("sd"), attention="sdpa")
    with pytest.raises(RuntimeError, match="CUDA"):
        gen.set_attention("xformers")


def test_a_tokenizer_folder_without_its_vocabulary_is_refused(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("sd"), folder)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer has .* tokens but text_encoder has a vocabulary of 49408"):
        load_generator(folder)


@pytest.mark.parametrize("size, head_width", [("testbed", 16), ("testbed-wide", 32)])
def test_testbed_unet_heads_are_as_wide_as_intended(size, head_width, tmp_path):
    # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads; the
    # testbed sizes once passed a width there and got 2-4-channel heads (a 3x slower step).
    from diffusers.models.attention_processor import Attention

    from visalign.models.tiny import build_tiny_components

    unet = build_tiny_components("sd", size=size, tokenizer_dir=tmp_path)["unet"]
    attentions = [module for module in unet.modules() if isinstance(module, Attention)]
    assert len(attentions) == 14  # self- and cross-attention of 7 transformers: 2 down, 1 mid, 2 x 2 up
    assert {module.inner_dim // module.heads for module in attentions} == {head_width}
