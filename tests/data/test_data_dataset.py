"""RecordDataset with DataLoader workers and accelerate's per-rank sharding."""

import datasets
import pytest
import torch
from data_builders import BLUE, RED, encode_image

from visalign.data import ImageTransform, RecordDataset, SkipCounter, collate, from_hf_dataset, make_dataloader

TRANSFORM = ImageTransform(resolution=8, random_flip=False)


def pair_table(num_records=10, bad=()):
    winners = [b"\x89PNG broken" if i in bad else encode_image(RED, size=(10, 10)) for i in range(num_records)]
    data = datasets.Dataset.from_dict({
        "prompt": [f"p{i}" for i in range(num_records)],
        "winner": winners,
        "loser": [encode_image(BLUE, size=(10, 10))] * num_records,
        "user_id": list(range(num_records)),
    })
    return from_hf_dataset(data, "pair")


def test_skips_from_worker_processes_are_counted_in_the_main_process():
    dataset = RecordDataset(pair_table(10, bad={2, 7}), TRANSFORM)
    loader = make_dataloader(dataset, batch_size=3, shuffle=True, num_workers=2, seed=0)
    skips = SkipCounter()
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for batch in loader:
            skips.update(batch.pop("skipped"))
    assert skips.num_records == 2 and skips.num_events == 4  # two bad records, two epochs
    assert [item.index for item in skips.records] == [2, 7]
    assert all(item.origin == f"dataset row {item.index}" for item in skips.records)
    restored = SkipCounter()
    restored.load_state_dict(skips.state_dict())
    assert restored.summary() == skips.summary()


def test_accelerate_shards_by_rank_and_keeps_the_batch_dict():
    from accelerate.data_loader import prepare_data_loader
    from accelerate.state import PartialState

    was_initialised = PartialState._shared_state != {}
    try:
        dataset = RecordDataset(pair_table(8), TRANSFORM)
        seen = []
        for rank in range(2):
            loader = prepare_data_loader(
                make_dataloader(dataset, batch_size=2, shuffle=True, seed=3),
                num_processes=2, process_index=rank, put_on_device=True, device=torch.device("cpu"),
            )
            indices = []
            for batch in loader:
                assert set(batch) >= {"prompts", "winner", "loser", "label", "user_ids", "skipped"}
                assert batch["winner"].shape == (2, 3, 8, 8)
                indices += batch["indices"].tolist()
            seen.append(indices)
        assert len(seen[0]) == len(seen[1]) == 4
        assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(8))
    finally:
        if not was_initialised:
            PartialState._reset_state()


def test_collate_rejects_mixed_kinds_and_empty_lists():
    pairs = RecordDataset(pair_table(2), TRANSFORM)
    captions = RecordDataset(
        from_hf_dataset(datasets.Dataset.from_dict({"prompt": ["c"], "image": [encode_image()]}), "caption"), TRANSFORM
    )
    with pytest.raises(ValueError, match="several kinds"):
        collate([pairs[0], captions[0]])
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    batch = collate([captions[0]])
    assert set(batch) == {"prompts", "indices", "original_sizes", "crop_top_lefts", "skipped", "images"}


def test_from_hf_dataset_names_missing_columns():
    data = datasets.Dataset.from_dict({"caption": ["c"], "image": [encode_image()]})
    with pytest.raises(ValueError, match=r"no column 'prompt' \(the caption field 'prompt'\)"):
        from_hf_dataset(data, "caption")
    table = from_hf_dataset(data, "caption", columns={"prompt": "caption"})
    assert table[0].prompt == "c"


def _caption_folder(folder, count=6, missing=()):
    from data_builders import pattern_image

    for i in range(count):
        if i not in missing:
            pattern_image(i, size=(12, 10)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    return folder


def _pixels(sample):
    return [sample[key] for key in ("image", "winner", "loser") if key in sample]


@pytest.mark.parametrize("kind", ["caption", "pair"])
def test_in_memory_gives_the_lazy_samples_and_skips(tmp_path, kind):
    from visalign.data import load_records

    transform = ImageTransform(resolution=8, random_crop=True, random_flip=True)
    if kind == "caption":
        folder = _caption_folder(tmp_path)
        (folder / "5.png").write_bytes(b"\x89PNG broken")  # corrupt: skipped alike with and without preloading
        records, bad = load_records("captions", str(folder)), 5
    else:
        records, bad = pair_table(6, bad={2}), 2
    lazy = RecordDataset(records, transform, seed=3)
    loaded = RecordDataset(records, transform, seed=3, in_memory=True)
    for epoch in range(2):  # fresh crops and flips each epoch, the same for both
        lazy.set_epoch(epoch)
        loaded.set_epoch(epoch)
        for index in range(len(lazy)):
            want, got = lazy[index], loaded[index]
            assert all(torch.equal(a, b) for a, b in zip(_pixels(got), _pixels(want), strict=True))
            assert got["crop_top_left"] == want["crop_top_left"] and got["index"] == want["index"]
            assert [s.index for s in got["skipped"]] == [s.index for s in want["skipped"]] == ([bad] if index == bad else [])


def test_in_memory_reads_no_file_after_preloading_even_in_workers(tmp_path):
    from visalign.data import load_records
    from visalign.data.skips import NoUsableRecordsError

    records = load_records("captions", str(_caption_folder(tmp_path)))
    lazy, loaded = RecordDataset(records, TRANSFORM), RecordDataset(records, TRANSFORM, in_memory=True)
    expected = [loaded[i]["image"] for i in range(len(loaded))]
    for path in tmp_path.glob("*.png"):
        path.unlink()
    with pytest.raises(NoUsableRecordsError):
        lazy[0]  # every file is gone
    assert all(torch.equal(loaded[i]["image"], expected[i]) for i in range(len(loaded)))
    loader = make_dataloader(loaded, batch_size=2, shuffle=False, num_workers=2)  # workers fork after preloading
    assert torch.equal(torch.cat([batch["images"] for batch in loader]), torch.stack(expected))


def test_tensor_pairs_collate_like_pair_records_for_images_and_clips():
    from visalign.data import TensorPairs

    clips = torch.rand(2, 3, 8, 3, 16, 16)
    pairs = TensorPairs(clips[0], clips[1], ["a", "b", "c"], labels=[1.0, 0.5, 1.0])
    batch = collate([pairs[i] for i in (2, 0)])
    assert batch["winner"].shape == (2, 8, 3, 16, 16) and torch.equal(batch["loser"][1], clips[1, 0])
    assert batch["prompts"] == ["c", "a"] and batch["label"].tolist() == [1.0, 1.0] and pairs.kind == "pair"
    assert batch["original_sizes"].tolist() == [[16, 16], [16, 16]]
    images = TensorPairs(clips[0, :, 0], clips[1, :, 0], ["a", "b", "c"])
    assert collate([images[1]])["winner"].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        TensorPairs(clips[0], clips[1, :, :4], ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 pairs but 2 prompts"):
        TensorPairs(clips[0], clips[1], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TensorPairs(clips[0] * 2, clips[1], ["a", "b", "c"])
    with pytest.raises(IndexError):
        pairs[3]
