"""Clips as training data: ``load_clip`` (video files, frame folders, frame lists), a
``RecordDataset`` of clips (one geometry for every frame of a record, bad clips skipped and
counted), collate's shapes, and the trainer reading clip pairs from a jsonl file."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from data_builders import pattern_image, write_jsonl
from PIL import Image

from visalign.data import ImageTransform, RecordDataset, collate, load_jsonl
from visalign.data.records import BadRecordError, load_clip

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def solid_frames(count, size=(20, 16), offset=0):
    """Frames of distinct solid colours (exact through GIF's palette); size is (width, height)."""
    return np.stack([np.full((size[1], size[0], 3), COLOURS[(i + offset) % len(COLOURS)], np.uint8)
                     for i in range(count)])


def write_gif(path, frames):
    iio.imwrite(path, frames, loop=0, duration=100)
    return str(path)


def write_frame_folder(folder, images):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(folder / f"frame_{i}.png")
    return str(folder)


def test_load_clip_reads_gifs_folders_in_natural_order_and_frame_lists(tmp_path):
    frames = solid_frames(5)
    gif = load_clip(write_gif(tmp_path / "a.gif", frames))
    assert len(gif) == 5 and all(f.size == (20, 16) and f.mode == "RGB" for f in gif)
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in gif]), frames)

    images = [pattern_image(i, size=(12, 10)) for i in range(12)]  # frame_10 must come after frame_9
    folder = load_clip(write_frame_folder(tmp_path / "clip", images))
    assert [np.asarray(f).tobytes() for f in folder] == [np.asarray(i).tobytes() for i in images]
    listed = load_clip([str(tmp_path / "clip" / f"frame_{i}.png") for i in range(3)])
    assert [np.asarray(f).tobytes() for f in listed] == [np.asarray(i).tobytes() for i in images[:3]]
    assert len(load_clip(str(tmp_path / "clip"), num_frames=4)) == 4


def test_load_clip_names_each_problem(tmp_path):
    for source in (None, str(tmp_path / "nope.gif"), []):
        with pytest.raises(BadRecordError, match="missing clip"):
            load_clip(source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadRecordError, match="missing clip: .*no frame images"):
        load_clip(str(tmp_path / "empty"))
    gif = write_gif(tmp_path / "a.gif", solid_frames(3))
    with pytest.raises(BadRecordError, match=r"short clip: .*3 frames, num_frames=4"):
        load_clip(gif, num_frames=4)
    (tmp_path / "bad.gif").write_bytes(b"GIF89a not really")
    with pytest.raises(BadRecordError, match="corrupt clip: .*bad.gif"):
        load_clip(str(tmp_path / "bad.gif"))
    folder = tmp_path / "mixed"
    write_frame_folder(folder, [pattern_image(0, size=(12, 10)), pattern_image(1, size=(10, 12))])
    with pytest.raises(BadRecordError, match="corrupt clip: .*frames of different sizes"):
        load_clip(str(folder))


def test_every_frame_of_a_record_gets_one_crop_and_flip(tmp_path):
    """All frames of both clips are the same picture: with one geometry per record they stay
    identical after a random crop and flip; the geometry still varies between records."""
    picture = pattern_image(7, size=(24, 20))
    clip = write_frame_folder(tmp_path / "same", [picture] * 4)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "winner": clip, "loser": clip}
                                                  for i in range(6)])
    transform = ImageTransform(resolution=12, random_crop=True, random_flip=True)
    dataset = RecordDataset(load_jsonl(path), transform, seed=3, clips=True)
    seen = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["winner"].shape == (4, 3, 12, 12) and sample["loser"].shape == (4, 3, 12, 12)
        frames = torch.cat([sample["winner"], sample["loser"]])
        assert all(torch.equal(frame, frames[0]) for frame in frames)
        seen.add(frames[0].numpy().tobytes())
    assert len(seen) > 1
    batch = collate([dataset[0], dataset[1]])
    assert batch["winner"].shape == (2, 4, 3, 12, 12)


def test_bad_and_short_clips_are_skipped_and_counted(tmp_path):
    good = write_gif(tmp_path / "good.gif", solid_frames(4))
    short = write_gif(tmp_path / "short.gif", solid_frames(2, offset=1))
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "winner": good, "loser": good},
        {"prompt": "b", "winner": short, "loser": good},
        {"prompt": "c", "winner": good, "loser": str(tmp_path / "gone.gif")},
    ])
    transform = ImageTransform(resolution=16, random_flip=False)
    dataset = RecordDataset(load_jsonl(path), transform, clips=True, num_frames=3)
    assert dataset[1]["index"] == 0  # records 1 and 2 are unusable: slot 1 falls through to record 0
    categories = {item.category for item in dataset[1]["skipped"] + dataset[2]["skipped"]}
    assert categories == {"short clip", "missing clip"}
    assert dataset[0]["winner"].shape == (3, 3, 16, 16)

    # Without num_frames, clips of one record must agree, and those of a batch too.
    loose = RecordDataset(load_jsonl(path), transform, clips=True)
    assert loose[1]["skipped"][0].category == "clip length mismatch"
    mixed = write_jsonl(tmp_path / "captions.jsonl", [{"prompt": "a", "image": good}, {"prompt": "b", "image": short}])
    captions = RecordDataset(load_jsonl(mixed), transform, clips=True)
    with pytest.raises(ValueError, match="different shapes .* set num_frames"):
        collate([captions[0], captions[1]])
    with pytest.raises(ValueError, match="num_frames=3 needs clips=True"):
        RecordDataset(load_jsonl(path), transform, num_frames=3)


def test_trainer_trains_a_video_model_on_clip_pairs_from_jsonl(tiny_model_dir, tmp_path):
    from visalign.config import ConfigError, load_config
    from visalign.training import TrainConfig, train

    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        winner = write_gif(tmp_path / f"w{i}.gif", solid_frames(6, size=(32, 32), offset=i))
        loser = write_gif(tmp_path / f"l{i}.gif", rng.integers(0, 2, (6, 32, 32, 3), dtype=np.uint8) * 255)
        records.append({"prompt": f"a red circle moving left {i}", "winner": winner, "loser": loser})
    path = write_jsonl(tmp_path / "pairs.jsonl", records)

    def config(family, **data):
        return load_config(TrainConfig, data={
            "model": {"path": str(tiny_model_dir(family)), "finetune": "lora", "lora": {"rank": 2}},
            "objective": "dpo", "options": {"beta": 100.0},
            "data": {"format": "jsonl", "path": path, "random_flip": False, **data},
            "optim": {"lr": 1e-2, "weight_decay": 0.0}, "batch_size": 2, "max_steps": 2,
            "checkpoint_every": 0, "log_every": 1, "output_dir": str(tmp_path / "run"), "seed": 0,
        })

    from visalign.models import load_generator

    generator = load_generator(tiny_model_dir("animatediff"), num_frames=4, height=32, width=32)
    result = train(config("animatediff"), generator=generator)
    assert result.step == 2
    lora_up = [p for n, p in generator.denoiser.named_parameters() if "lora_B" in n]
    assert lora_up and any(p.abs().sum() > 0 for p in lora_up)  # zero-initialised, so it trained
    logged = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 2

    with pytest.raises(ConfigError, match="data.clips: true needs a video model"):
        train(config("sd", clips=True))
    with pytest.raises(ConfigError, match="data.num_frames is for clips"):
        train(config("sd", num_frames=4))


def test_latent_cache_takes_clips_and_trains_the_same(tiny_model_dir, tmp_path):
    """A video model trained on clip pairs with data.cache_dir: the second epoch reads every
    clip's latents from the cache (no VAE call), and the cached latents are the video VAE's
    posterior means of the clips the dataset serves."""
    import json

    from visalign.config import load_config
    from visalign.data import LatentCache, cache_key
    from visalign.models import load_generator
    from visalign.training import TrainConfig, Trainer

    records = [{"prompt": f"a red circle moving left {i}",
                "winner": write_gif(tmp_path / f"w{i}.gif", solid_frames(6, size=(32, 32), offset=i)),
                "loser": write_gif(tmp_path / f"l{i}.gif", solid_frames(6, size=(32, 32), offset=i + 3))}
               for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)

    def run(name, **data):
        config = load_config(TrainConfig, data={
            "model": {"path": str(tiny_model_dir("animatediff")), "finetune": "lora", "lora": {"rank": 2}},
            "objective": "dpo", "options": {"beta": 100.0},
            "data": {"format": "jsonl", "path": path, "random_flip": False, "num_frames": 4, **data},
            "optim": {"lr": 1e-2, "weight_decay": 0.0}, "batch_size": 2, "max_steps": 4,
            "checkpoint_every": 0, "log_every": 1, "output_dir": str(tmp_path / name), "seed": 0,
        })
        generator = load_generator(tiny_model_dir("animatediff"), num_frames=4, height=32, width=32)
        trainer = Trainer(config, generator=generator)
        trainer.setup()
        calls = []
        encode = generator.vae.encode
        generator.vae.encode = lambda frames, *args, **kwargs: calls.append(len(frames)) or encode(frames, *args, **kwargs)
        trainer.train()
        return trainer, sum(calls)

    cached, cached_calls = run("cached", cache_dir=str(tmp_path / "cache"))
    plain, plain_calls = run("plain")
    assert cached.cache.misses == 4 and cached.cache.hits == 4  # 4 records, 2 epochs
    assert (cached_calls, plain_calls) == (4 * 2 * 4, 4 * 2 * 2 * 4)  # frames encoded: epoch 1 only vs every step
    sample = cached.dataset[1]
    stored = cached.cache._entry(1)
    with torch.no_grad():
        expected = plain.generator.encode(torch.stack([sample["winner"], sample["loser"]]), sample=False)
    assert stored["winner"].shape == expected.shape[1:]  # [C, F, h, w]
    torch.testing.assert_close(torch.stack([stored["winner"], stored["loser"]]), expected, rtol=1e-4, atol=1e-5)
    assert json.loads((cached.cache.path / "key.json").read_text())["clips"] == {"num_frames": 4}
    image_key = cache_key(RecordDataset(load_jsonl(path), ImageTransform(32, random_flip=False)), model="m",
                          dtype=torch.float32)
    clip_key = cache_key(RecordDataset(load_jsonl(path), ImageTransform(32, random_flip=False), clips=True,
                                       num_frames=4), model="m", dtype=torch.float32)
    assert str(image_key) != str(clip_key) and "clips" not in image_key.components
    assert isinstance(cached.cache, LatentCache)
