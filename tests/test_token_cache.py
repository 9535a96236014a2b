"""The tokenizer cache behind every Generator's prompt encoding: the same ids as the tokenizer,
each distinct prompt tokenised once, the real tokenizer back in the pipeline afterwards."""

import json

import pytest
import torch

from visalign.models import load_generator
from visalign.token_cache import CachingTokenizer

PROMPTS = ["a red circle", "two blue squares", "a red circle", "",
           "a green triangle to the left of a yellow square " * 8]  # the last one is longer than 77 tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from visalign.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


CALLS = [
    dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt"),  # diffusers' prompt ids
    dict(padding="longest", return_tensors="pt"),  # diffusers' truncation warning
    dict(padding="max_length", max_length=16, truncation=True, add_special_tokens=False, return_tensors="pt"),
    dict(padding="max_length", max_length=77, truncation=True, return_attention_mask=False, return_tensors="pt"),
    dict(padding=True, truncation=True, return_tensors="pt"),
]


@pytest.mark.parametrize("kwargs", CALLS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_ids_and_masks_equal_the_tokenizers(tokenizer, kwargs, side):
    tokenizer.padding_side = side
    try:
        cache = CachingTokenizer(tokenizer)
        for _ in range(2):  # the second round is served from the cache
            got, want = cache(PROMPTS, **kwargs), tokenizer(PROMPTS, **kwargs)
            assert set(got.keys()) == set(want.keys())
            for key in want:
                assert torch.equal(got[key], want[key]), key
            assert torch.equal(cache(PROMPTS[1], **kwargs).input_ids, tokenizer(PROMPTS[1], **kwargs).input_ids)
        assert cache.hits > 0
    finally:
        tokenizer.padding_side = "right"


def test_each_distinct_prompt_is_tokenised_once_and_the_oldest_goes_first(tokenizer):
    cache = CachingTokenizer(tokenizer, max_entries=3)
    kwargs = CALLS[0]
    cache(["a", "b", "a"], **kwargs)
    assert (cache.misses, cache.hits) == (2, 1)
    cache(["b", "a"], **kwargs)
    assert (cache.misses, cache.hits) == (2, 3)
    cache(["c", "d"], **kwargs)  # four entries > 3: "b" (least recently used) is dropped
    cache(["a"], **kwargs)
    assert cache.misses == 4
    cache(["b"], **kwargs)
    assert cache.misses == 5
    with pytest.raises(ValueError, match="max_entries"):
        CachingTokenizer(tokenizer, max_entries=0)


def test_calls_it_cannot_answer_go_to_the_tokenizer(tokenizer):
    cache = CachingTokenizer(tokenizer)
    ragged = dict(padding="max_length", max_length=8, return_tensors="pt")  # no truncation: the long prompt overflows
    with pytest.raises(ValueError):
        tokenizer(PROMPTS, **ragged)
    with pytest.raises(ValueError):
        cache(PROMPTS, **ragged)
    counts = (cache.misses, cache.hits)
    assert cache(PROMPTS[:2]).input_ids == tokenizer(PROMPTS[:2]).input_ids  # no return_tensors: lists, uncached
    assert cache(PROMPTS[:2], return_tensors="pt", padding="max_length", max_length=77, truncation=True,
                 return_offsets_mapping=False).input_ids.shape == (2, 77)  # an argument it does not know: uncached
    assert (cache.misses, cache.hits) == counts
    assert cache.model_max_length == tokenizer.model_max_length and len(cache) == len(tokenizer)


def test_the_cache_copies_and_pickles_with_its_entries(tokenizer):
    import copy
    import pickle

    cache = CachingTokenizer(tokenizer)
    want = cache(PROMPTS, **CALLS[0]).input_ids
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert torch.equal(clone(PROMPTS, **CALLS[0]).input_ids, want)
        assert clone.misses == cache.misses and clone.hits > cache.hits  # served from the copied entries


def test_added_tokens_invalidate_the_cache(tmp_path):
    from visalign.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(tmp_path)
    cache = CachingTokenizer(tokenizer)
    prompt = ["a photo of <cat-toy>"]
    before, tokens_before = cache(prompt, **CALLS[0]).input_ids, cache.tokenize(prompt[0])
    assert "<cat-toy>" not in cache.added_tokens_encoder
    tokenizer.add_tokens(["<cat-toy>"])  # textual inversion adds its token to the tokenizer
    after = cache(prompt, **CALLS[0]).input_ids
    assert not torch.equal(before, after)
    assert torch.equal(after, tokenizer(prompt, **CALLS[0]).input_ids)
    assert cache.tokenize(prompt[0]) == tokenizer.tokenize(prompt[0]) != tokens_before
    assert "<cat-toy>" in cache.added_tokens_encoder


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_generators_encode_through_the_cache_with_the_pipelines_embeddings(tiny_model_dir, tmp_path, family):
    generator = load_generator(tiny_model_dir(family))
    real = {name: getattr(generator.pipe, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
            if getattr(generator.pipe, name, None) is not None}
    cond = generator.encode_prompt(PROMPTS)
    extra = {"prompt_2": None, "prompt_3": None} if family == "sd3" else {}
    with torch.no_grad():  # the plain pipeline, its own tokenizers
        plain = generator.pipe.encode_prompt(PROMPTS, device=generator.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=False, **extra)
    assert torch.equal(cond.prompt_embeds, plain[0])
    if cond.pooled_embeds is not None:
        assert torch.equal(cond.pooled_embeds, plain[2])
    # The real tokenizers are back in the pipeline; every distinct prompt was tokenised once per setting.
    assert {name: getattr(generator.pipe, name) for name in real} == real
    caches = generator._token_caches
    assert set(caches) == set(real)
    misses = {name: cache.misses for name, cache in caches.items()}
    generator.encode_prompt(list(reversed(PROMPTS)))
    assert {name: cache.misses for name, cache in caches.items()} == misses
    assert all(cache.hits > 0 for cache in caches.values())
    # Saving after encoding records the real tokenizer classes.
    generator.pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    for name, tokenizer in real.items():
        assert index[name] == ["transformers", type(tokenizer).__name__]


def test_transformers_clip_rewards_tokenise_each_prompt_once(tmp_path):
    from rewards.tiny import tiny_transformers_clip_backbone

    backbone = tiny_transformers_clip_backbone(tmp_path)
    prompts = ["a red circle", "two blue squares", "a red circle"]
    first = backbone.embed_texts(prompts)
    assert backbone._token_cache.misses == 2
    assert torch.equal(backbone.embed_texts(list(reversed(prompts))), first.flip(0))
    assert (backbone._token_cache.misses, backbone._token_cache.hits) == (2, 2)
    tokens = backbone.tokenizer(prompts[:2], padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = backbone.model.text_model(**tokens).pooler_output
    assert torch.allclose(first[:2], torch.nn.functional.normalize(backbone.model.text_projection(pooled), dim=-1))
