"""Loaders: files on disk (or an already loaded ``datasets.Dataset``) -> :class:`RecordTable`.

==================  =====================================================  ============
loader              input                                                  records
==================  =====================================================  ============
``load_pickapic``   Pick-a-Pic parquet: ``caption, jpg_0, jpg_1, label_0``  pair
``load_hpdv2``      HPDv2 ``train.json`` / ``test.json``                    pair/ranking
``load_jsonl``      jsonl with image paths (any record kind)               any
``load_parquet``    parquet with image paths (``visalign dataset synth``)   any
``load_captions``   image folder + ``.txt`` captions, or jsonl / csv         caption
``from_hf_dataset`` a ``datasets.Dataset`` with canonical columns           any
==================  =====================================================  ============

Metadata problems (missing column, wrong type, malformed line) raise ``ValueError`` naming
the file, line and field, before any training work. Image problems are found later, when
the dataset decodes the image, and are skipped and counted there.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import datasets
import numpy as np

from visalign.data.records import RECORD_KINDS, BadRecordError, PairRecord
from visalign.data.table import (
    CanonicalReader,
    RankingPairsReader,
    RecordTable,
    RowOrigins,
    _hash,
    files_fingerprint,
)

logger = logging.getLogger(__name__)

Ties = Literal["drop", "keep"]
PathLike = str | os.PathLike
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _check_ties(ties: str) -> None:
    if ties not in ("drop", "keep"):
        raise ValueError(f"ties must be 'drop' or 'keep', got {ties!r}")


def _log_dropped(description: str, dropped: dict[str, int], total: int) -> None:
    for reason, count in dropped.items():
        logger.info("%s: dropped %d of %d rows (%s)", description, count, total, reason)


# --------------------------------------------------------------------------- Pick-a-Pic

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass(frozen=True)
class PickAPicReader:
    """``label_0`` is the probability that ``jpg_0`` is preferred: 1 -> ``jpg_0`` wins,
    0 -> ``jpg_1`` wins, 0.5 -> tie (``winner`` is ``jpg_0`` by convention, label 0.5)."""

    caption_column: str = "caption"
    has_user_id: bool = False

    def __call__(self, row: dict, spec: np.ndarray) -> PairRecord:
        caption = row[self.caption_column]
        if caption is None:
            raise BadRecordError("invalid record", f"{self.caption_column!r} is null")
        label_0 = float(row["label_0"])
        if label_0 >= 0.5:
            winner, loser, label = row["jpg_0"], row["jpg_1"], label_0
        else:
            winner, loser, label = row["jpg_1"], row["jpg_0"], 1.0 - label_0
        return PairRecord(str(caption), winner, loser, label, row["user_id"] if self.has_user_id else None)


def _parquet_files(source: PathLike | Sequence[PathLike], split: str) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            in_split = [f for f in files if os.path.basename(f).startswith(f"{split}-")]
            # The hub layout keeps every split in data/ as "<split>-XXXXX-of-YYYYY-*.parquet".
            files = in_split or files
        elif os.path.isfile(path):
            files = [path]
        else:
            files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"no parquet files found at {path!r}")
    else:
        files = [os.fspath(p) for p in source]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"parquet file(s) not found: {missing}")
    return files


def _column_values(data: datasets.Dataset, column: str) -> np.ndarray:
    """One column as numpy, honouring an indices mapping (shuffle/select) on ``data``."""
    return np.asarray(data.select_columns([column]).with_format("numpy")[:][column])


def load_pickapic(
    source: PathLike | Sequence[PathLike] | datasets.Dataset | datasets.DatasetDict,
    *,
    ties: Ties = "drop",
    split: str = "train",
    caption_column: str = "caption",
    drop_identical: bool = False,
    cache_dir: PathLike | None = None,
) -> RecordTable:
    """Load Pick-a-Pic-style preference pairs.

    Args:
        source: a parquet file, a directory of parquet shards (searched recursively; when
            some file names start with ``"{split}-"`` only those are used, as in the hub
            layout ``data/train-00000-of-00645-*.parquet``), a glob pattern, a list of
            files, or an already loaded ``datasets.Dataset`` / ``DatasetDict``.
        ties: ``"drop"`` (the reference Diffusion-DPO behaviour) removes rows with
            ``label_0 == 0.5``; ``"keep"`` keeps them as pairs with ``label == 0.5``.
        split: the split to take from a ``DatasetDict`` or a hub-layout directory.
        caption_column: the prompt column.
        drop_identical: drop rows whose ``are_different`` column is false (both images
            identical); ignored when the column is absent. Off by default, like the reference.
        cache_dir: where ``datasets`` writes its Arrow copy of the parquet files
            (default: the ``datasets`` cache).

    Columns: ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes), ``label_0`` (float:
    1 -> ``jpg_0`` preferred, 0 -> ``jpg_1`` preferred, 0.5 -> tie), optional ``user_id``
    and ``are_different``. Rows with a null or out-of-range ``label_0`` are dropped and
    counted in ``table.dropped``.
    """
    _check_ties(ties)
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise KeyError(f"split {split!r} not in DatasetDict (splits: {list(source)})")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        data, files, description = source, [], "Pick-a-Pic dataset"
    else:
        files = _parquet_files(source, split)
        description = files[0] if len(files) == 1 else f"{len(files)} parquet files under {os.path.dirname(files[0])}"
        data = datasets.load_dataset(
            "parquet", data_files=files, split="train", cache_dir=None if cache_dir is None else os.fspath(cache_dir)
        )

    required = (caption_column, "jpg_0", "jpg_1", "label_0")
    for column in required:
        if column not in data.column_names:
            raise ValueError(
                f"Pick-a-Pic data {description} has no column {column!r}; expected columns "
                f"{list(required)} (found {data.column_names})"
            )
    has_user_id = "user_id" in data.column_names
    keep = list(required) + (["user_id"] if has_user_id else [])
    labels = _column_values(data, "label_0").astype(np.float64)
    valid = np.isfinite(labels) & (labels >= 0.0) & (labels <= 1.0)
    mask = valid.copy()
    dropped: dict[str, int] = {}
    if (~valid).any():
        dropped["invalid label_0 (null or outside [0, 1])"] = int((~valid).sum())
        logger.warning(
            "%s: %d rows have an invalid label_0, e.g. row %d; they are dropped",
            description, int((~valid).sum()), int(np.flatnonzero(~valid)[0]),
        )
    if ties == "drop":
        is_tie = valid & (labels == 0.5)
        dropped["ties (label_0 == 0.5)"] = int(is_tie.sum())
        mask &= ~is_tie
    if drop_identical and "are_different" in data.column_names:
        identical = valid & ~_column_values(data, "are_different").astype(bool)
        dropped["identical images (are_different false)"] = int((identical & mask).sum())
        mask &= ~identical
    dropped = {reason: count for reason, count in dropped.items() if count}
    _log_dropped(description, dropped, len(data))

    if files:
        starts = np.cumsum([0] + [_parquet_num_rows(f) for f in files])[:-1]
        origins = RowOrigins(tuple(files), tuple(int(s) for s in starts), "row")
        fingerprint_base = files_fingerprint(files, {})
    else:
        origins = RowOrigins()
        fingerprint_base = data._fingerprint
    options = {"format": "pickapic", "ties": ties, "caption": caption_column, "drop_identical": drop_identical}
    return RecordTable(
        data.select_columns(keep),
        PickAPicReader(caption_column, has_user_id),
        kind="pair",
        rows=np.flatnonzero(mask),
        origins=origins,
        description=description,
        fingerprint=_hash({"data": fingerprint_base, "options": options}),
        dropped=dropped,
    )


def _parquet_num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# --------------------------------------------------------------------------- HPDv2


def load_hpdv2(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    as_pairs: bool | None = None,
    ties: Ties = "drop",
) -> RecordTable:
    """Load an HPDv2 annotation file (``train.json`` or ``test.json``).

    The two layouts of the dataset card (huggingface.co/datasets/ymhao/HPDv2)::

        train.json: [{"prompt": str, "file_path": [str, ...], "human_preference": [int, ...]}, ...]
                    # human_preference: 1 for the preferred image, 0 otherwise
        test.json:  [{"prompt": str, "image_path": [str, ...], "rank": [int, ...],
                      "raw_annotations": [{"rank": [...], "user_hash": str}, ...]}, ...]
                    # rank: averaged human ranking, 1 = best (HPSv2's evaluation convention)

    ``image_path`` and ``file_path`` are both accepted in either layout. An entry-level
    ``user_hash`` becomes ``user_id``.

    Args:
        path: the JSON file (a list of entries).
        image_root: folder the image paths are relative to (default: the JSON's folder).
            For the released archives that is the extracted ``train/`` or ``test/`` folder.
        as_pairs: ``None`` gives pairs for ``human_preference`` entries and rankings for
            ``rank`` entries. ``True`` expands every entry into all ``k*(k-1)/2`` pairs
            (higher score wins; equal scores are ties). ``False`` gives rankings only.
        ties: for pairs, ``"drop"`` or ``"keep"`` (``label == 0.5``).

    Ranking scores are "higher is better" and lie in [0, 1]: for ``rank`` entries the
    score of image i is the fraction of the other images ranked strictly worse (ranks
    [1, 2, 3] -> scores [1, 0.5, 0]); for ``human_preference`` entries it is the 0/1 vote.
    """
    _check_ties(ties)
    path = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        try:
            entries = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))

    columns: dict[str, list] = {"prompt": [], "images": [], "scores": [], "user_id": []}
    forms = set()
    for number, entry in enumerate(entries):
        where = f"{path} entry {number}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        prompt = _require(entry, "prompt", where, str)
        image_key = "image_path" if "image_path" in entry else "file_path"
        images = _require(entry, image_key, where, list, hint="'image_path' or 'file_path'")
        if "rank" in entry:
            forms.add("rank")
            ranks = _numbers(entry["rank"], len(images), where, "rank")
            scores = [sum(other > mine for other in ranks) / (len(ranks) - 1) for mine in ranks]
        elif "human_preference" in entry:
            forms.add("human_preference")
            scores = _numbers(entry["human_preference"], len(images), where, "human_preference")
        else:
            raise ValueError(f"{where}: needs a 'rank' or a 'human_preference' field (keys: {sorted(entry)})")
        if len(images) < 2:
            raise ValueError(f"{where}: needs at least 2 images, got {len(images)}")
        columns["prompt"].append(prompt)
        columns["images"].append([_resolve(p, root, where, image_key) for p in images])
        columns["scores"].append([float(s) for s in scores])
        user = entry.get("user_hash", entry.get("user_id"))
        columns["user_id"].append(None if user is None else str(user))
    if not entries:
        raise ValueError(f"{path}: the JSON list is empty")

    if as_pairs is None:
        if len(forms) > 1:
            raise ValueError(
                f"{path} mixes 'rank' and 'human_preference' entries; pass as_pairs=True to "
                "read all of them as pairs"
            )
        as_pairs = forms == {"human_preference"}
    data = datasets.Dataset.from_dict(columns)
    options = {"format": "hpdv2", "as_pairs": as_pairs, "ties": ties, "image_root": os.path.abspath(root)}
    fingerprint = _hash({"data": files_fingerprint([path], options)})
    origins = RowOrigins((path,), (0,), "entry")
    if not as_pairs:
        return RecordTable(
            data, CanonicalReader("ranking"), kind="ranking", origins=origins, description=path,
            fingerprint=fingerprint,
        )
    specs, dropped = _expand_pairs(columns["scores"], ties)
    _log_dropped(path, dropped, len(specs) + sum(dropped.values()))
    return RecordTable(
        data, RankingPairsReader(), kind="pair", rows=specs, origins=origins, description=path,
        fingerprint=fingerprint, dropped=dropped,
    )


def _expand_pairs(all_scores: list[list[float]], ties: str) -> tuple[np.ndarray, dict[str, int]]:
    specs, num_ties = [], 0
    for row, scores in enumerate(all_scores):
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if scores[i] == scores[j]:
                    num_ties += 1
                    if ties == "drop":
                        continue
                specs.append((row, i, j))
    dropped = {"ties (equal scores)": num_ties} if ties == "drop" and num_ties else {}
    return np.asarray(specs, dtype=np.int64).reshape(-1, 3), dropped


def _require(entry: dict, key: str, where: str, kind: type, hint: str | None = None) -> Any:
    if key not in entry:
        raise ValueError(f"{where}: missing field {hint or repr(key)} (keys: {sorted(entry)})")
    value = entry[key]
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _numbers(values: Any, length: int, where: str, key: str) -> list[float]:
    if (
        not isinstance(values, list)
        or len(values) != length
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise ValueError(f"{where}: {key!r} must be a list of {length} finite numbers (one per image), got {values!r}")
    return [float(v) for v in values]


def _resolve(image: Any, root: str, where: str, key: str) -> str:
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: {key!r} must hold non-empty path strings, got {image!r}")
    return image if os.path.isabs(image) else os.path.join(root, image)


# --------------------------------------------------------------------------- jsonl

_PROMPT_KEYS = ("prompt", "caption", "text")
_IMAGE_KEYS = ("image", "file_name", "image_path", "path")


def _detect_kind(record: dict) -> str | None:
    if "winner" in record and "loser" in record:
        return "pair"
    if "images" in record and "scores" in record:
        return "ranking"
    if "label" in record and any(k in record for k in _IMAGE_KEYS):
        return "feedback"
    if any(k in record for k in _IMAGE_KEYS) and any(k in record for k in _PROMPT_KEYS):
        return "caption"
    return None


_FEEDBACK_LABELS = {"good": 1.0, "bad": 0.0, "positive": 1.0, "negative": 0.0}


def _feedback_label(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.lower() in _FEEDBACK_LABELS:
        return _FEEDBACK_LABELS[value.lower()]
    raise ValueError(f"{where}: feedback 'label' must be true/false, 1/0 or 'good'/'bad', got {value!r}")


def _first_key(record: dict, keys: Sequence[str], where: str, what: str) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    raise ValueError(f"{where}: missing {what} field (one of {list(keys)}; keys: {sorted(record)})")


def load_jsonl(
    path: PathLike,
    *,
    kind: str | None = None,
    image_root: PathLike | None = None,
    ties: Ties = "drop",
) -> RecordTable:
    """Load records from a jsonl file whose image fields are paths.

    One JSON object per line (blank lines are ignored); the record kind is taken from the
    first line unless ``kind`` is given, and every line must match it:

    - pair: ``{"prompt", "winner", "loser"}`` [+ ``"label"``: probability that the winner
      is preferred, 1.0 by default, 0.5 for a tie] [+ ``"user_id"``]
    - ranking: ``{"prompt", "images": [...], "scores": [...]}`` (higher is better) [+ ``"user_id"``]
    - feedback: ``{"prompt", "image", "label"}`` with label true/false, 1/0 or "good"/"bad"
      [+ ``"user_id"``]
    - caption: ``{"image", "caption"}`` (``"prompt"`` or ``"text"`` also accepted for the
      caption; ``"file_name"``, ``"image_path"`` or ``"path"`` for the image)

    Relative image paths are resolved against ``image_root`` (default: the jsonl's folder).
    User ids are read as strings.
    """
    _check_ties(ties)
    path = os.fspath(path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    lines: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: invalid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            lines.append((number, record))
    if not lines:
        raise ValueError(f"{path}: no records (the file is empty)")
    if kind is None:
        kind = _detect_kind(lines[0][1])
        if kind is None:
            raise ValueError(
                f"{path} line {lines[0][0]}: cannot tell the record kind from keys {sorted(lines[0][1])}; "
                "expected winner/loser (pair), images/scores (ranking), image/label (feedback) or "
                "image/caption (caption), or pass kind="
            )
    elif kind not in RECORD_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(RECORD_KINDS)}")
    return _table_from_objects(lines, kind, root, path, "line", ties)


def _table_from_objects(
    lines: list[tuple[int, dict]], kind: str, root: str, path: str, unit: str, ties: str,
    origins: RowOrigins | None = None, fingerprint: str | None = None,
) -> RecordTable:
    columns: dict[str, list] = {name: [] for name in _CANONICAL_COLUMNS[kind]}
    for number, record in lines:
        where = f"{path} {unit} {number}"
        if kind == "caption":
            image = _first_key(record, _IMAGE_KEYS, where, "image")
            prompt = _first_key(record, ("caption", "prompt", "text"), where, "caption")
        else:
            prompt = _first_key(record, ("prompt",), where, "prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: the prompt must be a string, got {prompt!r}")
        columns["prompt"].append(prompt)
        if kind == "pair":
            for key in ("winner", "loser"):
                columns[key].append(_resolve(_first_key(record, (key,), where, key), root, where, key))
            label = record.get("label", 1.0)
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.5 <= label <= 1.0:
                raise ValueError(
                    f"{where}: pair 'label' is the probability that the winner is preferred and must "
                    f"be in [0.5, 1] (1 strict, 0.5 tie), got {label!r}"
                )
            columns["label"].append(float(label))
        elif kind == "ranking":
            images = _first_key(record, ("images",), where, "images")
            if not isinstance(images, list) or len(images) < 2:
                raise ValueError(f"{where}: 'images' must be a list of at least 2 paths, got {images!r}")
            columns["images"].append([_resolve(p, root, where, "images") for p in images])
            columns["scores"].append(_numbers(_first_key(record, ("scores",), where, "scores"), len(images), where, "scores"))
        elif kind == "feedback":
            columns["image"].append(_resolve(_first_key(record, _IMAGE_KEYS, where, "image"), root, where, "image"))
            columns["label"].append(_feedback_label(record["label"], where))
        else:
            columns["image"].append(_resolve(image, root, where, "image"))
        if "user_id" in columns:
            user = record.get("user_id")
            columns["user_id"].append(None if user is None else str(user))

    rows = np.arange(len(lines), dtype=np.int64)
    dropped: dict[str, int] = {}
    if kind == "pair" and ties == "drop":
        is_tie = np.asarray(columns["label"]) == 0.5
        if is_tie.any():
            dropped["ties (label == 0.5)"] = int(is_tie.sum())
        rows = rows[~is_tie]
    _log_dropped(path, dropped, len(lines))
    options = {"format": "jsonl", "kind": kind, "ties": ties, "image_root": os.path.abspath(root)}
    return RecordTable(
        datasets.Dataset.from_dict(columns),
        CanonicalReader(kind),
        kind=kind,
        rows=rows,
        origins=origins or RowOrigins((path,), (0,), unit, np.asarray([number for number, _ in lines])),
        description=path,
        fingerprint=fingerprint or files_fingerprint([path], options),
        dropped=dropped,
    )


_CANONICAL_COLUMNS = {
    "pair": ("prompt", "winner", "loser", "label", "user_id"),
    "ranking": ("prompt", "images", "scores", "user_id"),
    "feedback": ("prompt", "image", "label", "user_id"),
    "caption": ("prompt", "image"),
}
_REQUIRED_COLUMNS = {
    "pair": ("prompt", "winner", "loser"),
    "ranking": ("prompt", "images", "scores"),
    "feedback": ("prompt", "image", "label"),
    "caption": ("prompt", "image"),
}


# --------------------------------------------------------------------------- parquet with image paths


def load_parquet(
    source: PathLike | Sequence[PathLike],
    *,
    kind: str | None = None,
    image_root: PathLike | None = None,
    as_pairs: bool = False,
    drop_flat: bool = False,
    ties: Ties = "drop",
) -> RecordTable:
    """Load records from parquet files whose image columns hold paths, e.g. the ranked data sets
    ``visalign dataset synth`` writes (one ``ranking`` row per prompt, ``scores`` = Syn-Pic's phi).

    Args:
        source: a parquet file, a folder (every ``*.parquet`` under it), a glob, or a list.
        kind: the record kind; default: detected from the first row's columns as in
            :func:`load_jsonl` (the same canonical columns; other columns are ignored).
        image_root: folder relative image paths are resolved against (default: each parquet
            file's own folder).
        as_pairs: ranking rows expanded into every pair of images with different scores
            (higher wins; equal scores are ties, dropped unless ``ties="keep"``), as
            :func:`load_hpdv2` does: DPO on the same images a ranked method sees.
        drop_flat: leave out (and count) rankings whose scores are all equal: they hold no
            preference (RankDPO gives them zero loss but they still cost forward passes).
    """
    import pyarrow.parquet as pq

    _check_ties(ties)
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(os.fspath(source), "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no parquet files found under {os.fspath(source)!r}")
    else:
        files = _parquet_files(source, split="train")
    description = files[0] if len(files) == 1 else f"{len(files)} parquet files under {os.path.dirname(files[0])}"
    lines: list[tuple[int, dict]] = []
    file_of: list[int] = []
    for file_index, file in enumerate(files):
        root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(file))
        for number, row in enumerate(pq.read_table(file).to_pylist()):
            where = f"{file} row {number}"
            for key in ("winner", "loser", "image", "file_name", "image_path", "path"):
                if key in row:
                    row[key] = _resolve(row[key], root, where, key)
            if isinstance(row.get("images"), list):
                row["images"] = [_resolve(image, root, where, "images") for image in row["images"]]
            lines.append((number, row))
            file_of.append(file_index)
    if not lines:
        raise ValueError(f"{description}: no records (the parquet files are empty)")
    if kind is None:
        kind = _detect_kind(lines[0][1])
        if kind is None:
            raise ValueError(f"{files[0]} row 0: cannot tell the record kind from columns {sorted(lines[0][1])}; "
                             "pass kind=")
    elif kind not in RECORD_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(RECORD_KINDS)}")
    if as_pairs and kind != "ranking":
        raise ValueError(f"as_pairs expands ranking records; {description} holds {kind} records")
    flat = 0
    if drop_flat and kind == "ranking":
        keep = [len(set(row.get("scores") or [])) > 1 for _, row in lines]
        flat = keep.count(False)
        lines = [line for line, kept in zip(lines, keep) if kept]
        file_of = [index for index, kept in zip(file_of, keep) if kept]
        if not lines:
            raise ValueError(f"{description}: every ranking has equal scores (no preference to learn)")
    options = {"format": "parquet", "kind": kind, "ties": ties, "as_pairs": as_pairs, "drop_flat": drop_flat,
               "image_root": None if image_root is None else os.path.abspath(image_root)}
    starts = tuple(int(np.searchsorted(file_of, index, side="left")) for index in range(len(files)))
    origins = RowOrigins(tuple(files), starts, "row", np.asarray([number for number, _ in lines]))
    fingerprint = files_fingerprint(files, options)
    table = _table_from_objects(lines, kind, "", description, "row", ties, origins, fingerprint)
    if flat:
        table.dropped["rankings with all scores equal"] = flat
        _log_dropped(description, {"rankings with all scores equal": flat}, len(lines) + flat)
    if not as_pairs:
        return table
    specs, dropped = _expand_pairs(table.data["scores"], ties)
    _log_dropped(description, dropped, len(specs) + sum(dropped.values()))
    return RecordTable(table.data, RankingPairsReader(), kind="pair", rows=specs, origins=origins,
                       description=description, fingerprint=fingerprint, dropped={**table.dropped, **dropped})


# --------------------------------------------------------------------------- captions


def load_captions(
    source: PathLike,
    *,
    image_root: PathLike | None = None,
) -> RecordTable:
    """Load captioned images for supervised fine-tuning.

    ``source`` is either
    - a folder: every image (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff``, searched
      recursively) with a caption in a same-name ``.txt`` file beside it
      (``cat.png`` + ``cat.txt``); images without a caption file are dropped and counted;
    - a ``.jsonl`` file: see :func:`load_jsonl` (kind "caption");
    - a ``.csv`` file with a header: image column ``image`` (or ``file_name``,
      ``image_path``, ``path``) and caption column ``caption`` (or ``prompt``, ``text``).

    Relative image paths are resolved against ``image_root`` (default: the file's folder).
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        return _load_caption_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no caption folder or file at {path!r}")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path, kind="caption", image_root=root)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ValueError(f"{path}: empty csv (no header row)")
            # Line numbers of the data rows: the header is line 1.
            lines = [(number, dict(row)) for number, row in enumerate(reader, start=2)]
        if not lines:
            raise ValueError(f"{path}: no records (only a header)")
        header = set(reader.fieldnames)
        _first_key(dict.fromkeys(header), _IMAGE_KEYS, f"{path} header", "image column")
        _first_key(dict.fromkeys(header), ("caption", "prompt", "text"), f"{path} header", "caption column")
        return _table_from_objects(lines, "caption", root, path, "line", "drop")
    raise ValueError(f"{path}: expected a folder, a .jsonl or a .csv file, got {suffix!r}")


def _load_caption_folder(folder: str) -> RecordTable:
    images = sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    columns: dict[str, list] = {"prompt": [], "image": []}
    missing = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            missing.append(str(image))
            continue
        columns["prompt"].append(caption_file.read_text(encoding="utf-8").strip())
        columns["image"].append(str(image))
    dropped = {"images without a .txt caption": len(missing)} if missing else {}
    if missing:
        logger.warning("%s: %d images have no .txt caption and are left out, e.g. %s", folder, len(missing), missing[0])
    if not columns["image"]:
        raise ValueError(f"{folder}: none of the {len(images)} images has a same-name .txt caption file")
    files = [*columns["image"], *(str(Path(p).with_suffix(".txt")) for p in columns["image"])]
    return RecordTable(
        datasets.Dataset.from_dict(columns),
        CanonicalReader("caption"),
        kind="caption",
        origins=RowOrigins((folder,), (0,), "image"),
        description=folder,
        fingerprint=files_fingerprint(files, {"format": "caption-folder"}),
        dropped=dropped,
    )


# --------------------------------------------------------------------------- datasets.Dataset


def from_hf_dataset(
    data: datasets.Dataset,
    kind: str,
    *,
    columns: dict[str, str] | None = None,
    ties: Ties = "drop",
) -> RecordTable:
    """Wrap a ``datasets.Dataset`` that already has one row per record.

    Canonical columns per kind (``columns`` maps canonical name -> your column name):
    pair ``prompt, winner, loser`` [+ ``label``, ``user_id``]; ranking ``prompt, images,
    scores`` [+ ``user_id``]; feedback ``prompt, image, label`` [+ ``user_id``]; caption
    ``prompt, image``. Image columns may hold bytes, paths, or ``datasets.Image`` values.
    """
    _check_ties(ties)
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(RECORD_KINDS)}")
    columns = dict(columns or {})
    unknown = set(columns) - set(_CANONICAL_COLUMNS[kind])
    if unknown:
        raise ValueError(f"columns= names {sorted(unknown)} are not {kind} fields {list(_CANONICAL_COLUMNS[kind])}")
    for name in _REQUIRED_COLUMNS[kind]:
        actual = columns.get(name, name)
        if actual not in data.column_names:
            raise ValueError(
                f"dataset has no column {actual!r} (the {kind} field {name!r}); found {data.column_names}"
            )
    present = [n for n in _CANONICAL_COLUMNS[kind] if columns.get(n, n) in data.column_names]
    rows, dropped = None, {}
    label_column = columns.get("label", "label")
    if kind == "pair" and label_column in data.column_names:
        labels = _column_values(data, label_column).astype(np.float64)
        invalid = ~(np.isfinite(labels) & (labels >= 0.5) & (labels <= 1.0))
        if invalid.any():
            raise ValueError(
                f"column {label_column!r} must hold the probability that the winner is preferred, "
                f"in [0.5, 1]; row {int(np.flatnonzero(invalid)[0])} has {labels[invalid][0]}"
            )
        is_tie = labels == 0.5
        if ties == "drop" and is_tie.any():
            dropped["ties (label == 0.5)"] = int(is_tie.sum())
            rows = np.flatnonzero(~is_tie)
    options = {"format": "hf", "kind": kind, "columns": columns, "ties": ties}
    return RecordTable(
        data.select_columns([columns.get(n, n) for n in present]),
        CanonicalReader(kind, tuple(sorted(columns.items()))),
        kind=kind,
        rows=rows,
        description="datasets.Dataset",
        fingerprint=_hash({"data": data._fingerprint, "options": options}),
        dropped=dropped,
    )


# --------------------------------------------------------------------------- by name

LOADERS = {
    "pickapic": load_pickapic,
    "hpdv2": load_hpdv2,
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "captions": load_captions,
}


def load_records(format: str, source: Any, **options: Any) -> RecordTable:
    """Load by format name (for configs): ``load_records("pickapic", "data/", ties="keep")``."""
    if format not in LOADERS:
        raise ValueError(f"unknown data format {format!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[format](source, **options)
