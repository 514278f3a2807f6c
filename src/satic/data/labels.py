"""Caption labels in the reference formats: cocotalk.json and cocotalk_label.h5.

`build_vocabulary` and `encode_captions` reproduce the reference's label preprocessing
(prepro_labels.py) so that a COCO user's files and ours are interchangeable:
- words are kept when they occur more than `word_count_threshold` times, in the order in
  which they first appear in the Karpathy file; 'UNK' is appended last only if some word
  was dropped;
- captions are cut at `max_length` words and stored as uint32 rows, zero padded;
- `label_start_ix` / `label_end_ix` are 1-based and inclusive (Lua style), one per image;
- cocotalk.json keeps each image's split (restval stays 'restval'; the loader trains on it),
  'file_path' (filepath/filename) when the entry has a filename, and 'id' = cocoid when the
  entry has one, else its imgid (Flickr8k/30k Karpathy files have no cocoid);
- a caption token that is literally 'UNK' is the unknown word: when it is frequent and some word
  was dropped, the vocabulary lists 'UNK' twice, and both map to the last index;
- in the CIDEr-D references a caption token that is literally '<eos>' is the end token "0".
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from satic.data.vocab import UNK, Vocabulary, word_problem
from satic.errors import SaticError, counted, first_few, library_reason
from satic.evaluation.document_frequency import DEFAULT_FILENAME as CIDER_DF_NAME
from satic.evaluation.document_frequency import DocumentFrequency, load_reference_pickle
from satic.evaluation.results import REFERENCES_NAME, evaluation_references_file, is_image_id, result_id
from satic.io import (atomic_path, check_output_dir, left_unfinished, read_json, refuse_existing_in,
                      require_file, staged_outputs, unfinished_set, user_outputs, write_json)

# the Karpathy splits each split of the prepared data reads: the reference trains on restval too
SPLIT_MEMBERS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
KARPATHY_SPLITS = tuple(name for members in SPLIT_MEMBERS.values() for name in members)


@dataclass(frozen=True)
class LabelData:
    """The contents of a cocotalk_label.h5 file."""

    labels: np.ndarray  # (M, L) uint32, zero padded
    label_start_ix: np.ndarray  # (num_images,) uint32, 1-based, inclusive
    label_end_ix: np.ndarray  # (num_images,) uint32, 1-based, inclusive
    label_length: np.ndarray  # (M,) uint32

    @property
    def seq_length(self) -> int:
        return int(self.labels.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.label_start_ix.shape[0])

    def captions(self, image_index: int) -> np.ndarray:
        """All label rows of one image, (n, L)."""
        start = int(self.label_start_ix[image_index]) - 1
        end = int(self.label_end_ix[image_index])
        return self.labels[start:end]


def karpathy_images(path: str | os.PathLike) -> list[dict]:
    """The 'images' list of a Karpathy split file, checked for the fields prepro needs."""
    data = read_json(path, "Karpathy split file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise SaticError(f"{path}: expected a Karpathy split file with a non-empty 'images' list")
    if isinstance(data.get("annotations"), list) and not any(isinstance(img, dict) and "sentences" in img
                                                               for img in images):
        raise SaticError(f"{path} is a COCO captions file (images and annotations); satic prepro reads a Karpathy "
                         'split file: {"images": [{"filename": ..., "cocoid": ..., "split": "train", "sentences": '
                         '[{"tokens": ["a", "dog"], "raw": "A dog."}, ...]}, ...]}, with each image\'s split '
                         f"(one of {list(KARPATHY_SPLITS)}) and tokenized captions")
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "split" not in img or not isinstance(img.get("sentences"), list):
            raise SaticError(f"{path}: images[{i}] needs 'split' and a 'sentences' list")
        if img["split"] not in KARPATHY_SPLITS:
            raise SaticError(f"{path}: images[{i}] ({_describe(img)}) has split {img['split']!r}; a Karpathy split "
                             f"is one of {list(KARPATHY_SPLITS)}")
        if not img["sentences"]:
            raise SaticError(f"{path}: images[{i}] ({_describe(img)}) has no captions; remove it or add sentences")
        not_text = next((k for k in ("filepath", "filename") if k in img and not isinstance(img[k], str)), None)
        if not_text:
            raise SaticError(f"{path}: images[{i}] ({_describe(img)}) has {not_text} {json.dumps(img[not_text])}; "
                             f"a {not_text} is a string (the image file's folder and name, as in "
                             '"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg")')
        for j, sent in enumerate(img["sentences"]):
            tokens = sent.get("tokens") if isinstance(sent, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise SaticError(f"{path}: images[{i}].sentences[{j}] needs a 'tokens' list of strings")
            if not tokens:
                raise SaticError(f"{path}: images[{i}] ({_describe(img)}) sentence {j} is empty; remove it")
            odd = next((t for t in tokens if word_problem(t)), None)
            if odd is not None:  # it would become a vocabulary word that training refuses
                raise SaticError(f"{path}: images[{i}] ({_describe(img)}) sentence {j} has the token {odd!r}, "
                                 f"{word_problem(odd)}; split it into words, or remove it")
    _check_unique_cocoids(images, path)
    return images


def image_id_field(img: dict) -> str | None:
    """The field the prepared data takes an image's id from, as self-critical.pytorch's prepro_labels.py:
    'cocoid', else 'imgid' (Flickr8k/30k Karpathy files have no cocoid), else None (kept without an id)."""
    return next((k for k in ("cocoid", "imgid") if k in img), None)


def _check_unique_cocoids(images: Sequence[dict], path: str | os.PathLike) -> None:
    """An id names one image's features and references; two entries with one id would mix them up."""
    first: dict = {}
    for i, img in enumerate(images):
        field = image_id_field(img)
        if field is None:  # kept without an id, as the reference's prepro_labels.py
            continue
        image_id = img[field]
        if not is_image_id(image_id):
            raise SaticError(f"{path}: images[{i}] has {field} {image_id!r}; a {field} is an integer (or a string) "
                             "that names the image's feature file")
        # 1 and "1" name one feature file, "1" and "01" one results image_id
        j, first_field = first.setdefault(result_id(str(image_id)), (i, field))
        if j != i:
            other = images[j][first_field]
            if other != image_id:
                both = f"have {first_field} {other!r} and {field} {image_id!r}, one id for features and results"
            elif field == first_field:
                both = f"both have {field} {image_id!r}"
            else:
                both = f"have {first_field} and {field} {image_id!r}, the same id"
            raise SaticError(f"{path}: images[{j}] ({_describe(images[j])}) and images[{i}] ({_describe(img)}) "
                             f"{both}; give every image its own {field}")


def _describe(img: dict) -> str:
    name = img.get("filename")
    return name if isinstance(name, str) else str(img.get("cocoid", "?"))


def word_counts(images: Sequence[dict]) -> dict[str, int]:
    """Token counts over every caption; dict order is the order of first appearance."""
    counts: dict[str, int] = {}
    for img in images:
        for sent in img["sentences"]:
            for w in sent["tokens"]:
                counts[w] = counts.get(w, 0) + 1
    return counts


def build_vocabulary(images: Sequence[dict], word_count_threshold: int = 5,
                     counts: dict[str, int] | None = None) -> Vocabulary:
    """Words seen more than the threshold, first-appearance order, 'UNK' last if any was dropped; `counts`: the
    images' word_counts, where the caller has them."""
    counts = word_counts(images) if counts is None else counts
    kept = [w for w, n in counts.items() if n > word_count_threshold]
    if not kept:
        raise SaticError(f"--word-count-threshold {word_count_threshold} keeps no word (the most frequent appears "
                         f"{max(counts.values())} times); give a smaller threshold")
    if len(kept) < len(counts):
        kept.append(UNK)
    return Vocabulary(tuple(kept))


def vocabulary_summary(counts: dict[str, int], word_count_threshold: int) -> str:
    """One line on the vocabulary build_vocabulary keeps from these word counts, and what UNK replaces (the share of
    word occurrences, as the reference's prepro_labels.py prints it)."""
    rare = [n for n in counts.values() if n <= word_count_threshold]
    line = (f"vocabulary: {counted(len(counts) - len(rare), 'word')} seen more than "
            f"{counted(word_count_threshold, 'time')} (--word-count-threshold)")
    if not rare:
        return line + "; no UNK"
    unk, total = sum(rare), sum(counts.values())
    return line + (f", and UNK for {counted(len(rare), 'rarer word')}: {unk:,} of the {total:,} words written in the "
                   f"captions ({unk / total:.1%})")


def encode_captions(images: Sequence[dict], vocab: Vocabulary, max_length: int = 16) -> LabelData:
    """Every caption as a zero-padded uint32 row cut at max_length, grouped per image."""
    if max_length < 1:
        raise SaticError(f"--max-length must be at least 1, got {max_length}")
    rows, lengths, starts, ends = [], [], [], []
    for img in images:
        starts.append(len(rows) + 1)
        for sent in img["sentences"]:
            ids = vocab.encode(sent["tokens"])[:max_length]
            row = np.zeros(max_length, dtype=np.uint32)
            row[: len(ids)] = ids
            rows.append(row)
            lengths.append(len(ids))
        ends.append(len(rows))
    return LabelData(
        labels=np.stack(rows).astype(np.uint32),
        label_start_ix=np.asarray(starts, dtype=np.uint32),
        label_end_ix=np.asarray(ends, dtype=np.uint32),
        label_length=np.asarray(lengths, dtype=np.uint32),
    )


def cocotalk_images(images: Sequence[dict], images_root: str | os.PathLike | None = None) -> list[dict]:
    """The 'images' entries of cocotalk.json; with images_root, also width/height as the reference."""
    out = []
    for img in images:
        entry: dict = {"split": img["split"]}
        if "filename" in img:
            entry["file_path"] = os.path.join(img.get("filepath", ""), img["filename"])
        field = image_id_field(img)
        if field is not None:
            entry["id"] = img[field]
        if images_root is not None:
            entry["width"], entry["height"] = _image_size(Path(images_root) / entry.get("file_path", ""))
        out.append(entry)
    return out


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError) as err:
        raise SaticError(f"cannot read image {path} ({err}); check --images-root") from err


def write_cocotalk(path: str | os.PathLike, vocab: Vocabulary, images: list[dict]) -> None:
    write_json(path, {"ix_to_word": vocab.to_ix_to_word(), "images": images}, indent=None)


def read_cocotalk(path: str | os.PathLike) -> tuple[Vocabulary, list[dict]]:
    """(vocabulary, image entries) of a cocotalk.json file."""
    require_file(path, "cocotalk.json", "run `satic prepro` (or `satic synth`) to make it")
    data = read_json(path, "cocotalk.json")
    if not isinstance(data, dict) or "ix_to_word" not in data or not isinstance(data.get("images"), list):
        raise SaticError(f"{path}: expected 'ix_to_word' and 'images'; re-create it with `satic prepro`")
    vocab = Vocabulary.from_ix_to_word(data["ix_to_word"], source=str(path), fix="re-create it with `satic prepro`")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "split" not in img:
            raise SaticError(f"{path}: images[{i}] has no 'split'; re-create it with `satic prepro`")
        if not isinstance(img["split"], str):  # a list or null names no split (the loader would train on it)
            raise SaticError(f"{path}: images[{i}] has split {json.dumps(img['split'])}; a split is a string such "
                             f"as \"train\" (one of {list(KARPATHY_SPLITS)}); re-create it with `satic prepro`")
    return vocab, data["images"]


H5_FIELDS = ("labels", "label_start_ix", "label_end_ix", "label_length")


def write_label_h5(path: str | os.PathLike, data: LabelData, replace: bool = True) -> None:
    """The label file, written atomically; replace=False keeps a file another process wrote there meanwhile. It is
    made in memory (the bytes HDF5 writes to a disk file) and then written as plain bytes: HDF5 cannot recover from
    a write the system refuses (a full disk), and its handles then crash the process as they are freed."""
    with h5py.File(Path(path).name, "w", driver="core", backing_store=False) as f:  # the name is not written
        for name in H5_FIELDS:
            f.create_dataset(name, dtype="uint32", data=getattr(data, name))
        f.flush()
        image = f.id.get_file_image()
    with atomic_path(path, replace) as tmp:
        tmp.write_bytes(image)


def read_label_h5(path: str | os.PathLike) -> LabelData:
    """Load a label file fully (it is small) and check that its indices are consistent."""
    path = require_file(path, "label file", "run `satic prepro` to make it")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SaticError(f"label file {path} is not a readable HDF5 file ({err}); re-create it with "
                         "`satic prepro`") from err
    try:
        with f:
            missing = [n for n in H5_FIELDS if n not in f and n != "label_length"]
            if missing:
                raise SaticError(f"label file {path} lacks {missing}; re-create it with `satic prepro`")
            arrays = {n: _label_array(f, n, path) for n in H5_FIELDS if n in f}
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # HDF5 keeps no checksums: damage shows as any
        raise SaticError(f"label file {path}: cannot read it ({library_reason(err)}); the file is damaged: copy it "
                         "again, or re-create it with `satic prepro`") from err
    for name, array in arrays.items():  # word and row indices: a float, string or negative one indexes nothing
        integers = np.issubdtype(array.dtype, np.integer)
        if not integers or array.min(initial=0) < 0:
            what = "a negative number" if integers else f"dtype {array.dtype}"
            raise SaticError(f"label file {path}: {name} holds {what}, not word or row indices (whole numbers from "
                             "0); re-create it with `satic prepro`")
    if "label_length" not in arrays:  # the reference's loaders never read it: each row's words are its nonzeros
        labels = arrays["labels"]
        arrays["label_length"] = (labels != 0).sum(-1, dtype=np.uint32) if labels.ndim else labels
    data = LabelData(**arrays)
    _check_labels(data, path)
    return data


def _label_array(f: h5py.File, name: str, path: Path) -> np.ndarray:
    """One of the label file's datasets, read whole."""
    dataset = f[name]
    if not isinstance(dataset, h5py.Dataset):
        raise SaticError(f"label file {path}: {name} is a group, not an array; re-create it with `satic prepro`")
    value = dataset[()]
    if isinstance(value, h5py.Empty):  # a dataset of no shape, which holds no number
        raise SaticError(f"label file {path}: {name} is an empty dataset (no shape), not an array; re-create it with "
                         "`satic prepro`")
    return np.asarray(value)  # a scalar dataset as a 0-d array, named by _check_labels


def _check_labels(data: LabelData, path: Path) -> None:
    if data.labels.ndim != 2 or data.label_length.shape != data.labels.shape[:1]:
        raise SaticError(f"label file {path}: labels must be (M, L) and label_length (M,)")
    if data.labels.shape[1] < 1:  # a model trained on it would learn captions of no words
        raise SaticError(f"label file {path}: labels has no columns (shape {data.labels.shape}), so no caption has a "
                         "word; re-create it with `satic prepro`")
    m = data.labels.shape[0]
    if data.label_start_ix.ndim != 1 or data.label_start_ix.shape != data.label_end_ix.shape:
        raise SaticError(f"label file {path}: label_start_ix and label_end_ix must be (num_images,) alike")
    start = data.label_start_ix.astype(np.int64)
    end = data.label_end_ix.astype(np.int64)
    if np.any(start < 1) or np.any(end < start) or np.any(end > m):
        raise SaticError(f"label file {path}: start/end indices must satisfy 1 <= start <= end <= {m}")


def check_labels_match(data: LabelData, images: list[dict], vocab_size: int, label_path: str | os.PathLike,
                       info_path: str | os.PathLike) -> None:
    """The label file fits the info file: one caption range per image, and word indices within its vocabulary
    (1..vocab_size; 0 pads)."""
    if data.num_images != len(images):
        raise SaticError(
            f"{label_path} has captions for {data.num_images} images but {info_path} lists {len(images)}; "
            "use files made by the same `satic prepro` run"
        )
    largest = int(data.labels.max(initial=0))
    if largest > vocab_size:
        raise SaticError(f"{label_path} uses word index {largest} but {info_path} has {vocab_size} words; use labels "
                         "and a vocabulary made by the same `satic prepro` run (seq-KD labels: by a teacher trained "
                         "on that vocabulary)")


def training_references(images: Sequence[dict], vocab: Vocabulary) -> list[list[list[str]]]:
    """CIDEr-D references of the train + restval images, as the reference's prepro_ngrams.py.

    Each caption is its full token list (not cut at max_length) mapped to word indices
    (unknown words to UNK), plus the end token "0", all as strings. As there, a token that is
    literally '<eos>' is the end token "0" too (its word table maps '<eos>' to 0 over the vocabulary).
    """
    names = [str(i) for i in range(len(vocab) + 1)]  # one string per index, shared by every caption's tokens
    refs = []
    for img in images:
        if img["split"] in SPLIT_MEMBERS["train"]:
            refs.append([_reference_tokens(s["tokens"], vocab, names) for s in img["sentences"]])
    return refs


EOS_TOKEN = "<eos>"  # prepro_ngrams.py's name for index 0


def _reference_tokens(tokens: Sequence[str], vocab: Vocabulary, names: Sequence[str]) -> list[str]:
    return ["0" if t == EOS_TOKEN else names[i] for t, i in zip(tokens, vocab.encode(tokens))] + ["0"]


def training_document_frequency(images: Sequence[dict], vocab: Vocabulary,
                                source: str | os.PathLike) -> DocumentFrequency:
    """CIDEr-D document frequencies of the training references; the references (strings of every training caption,
    hundreds of MB at COCO's size) are freed on return, before the outputs are written."""
    refs = training_references(images, vocab)
    if not refs:
        raise SaticError(f"{source}: no train or restval images; the CIDEr-D statistics need some")
    return DocumentFrequency.from_references(refs)


@dataclass(frozen=True)
class PreparedPaths:
    info_json: Path
    label_h5: Path
    cider_df: Path
    references: Path | None  # the val and test images' raw captions (None: the file has no such images)
    vocabulary: str = ""  # a line on the words kept and those UNK replaces (vocabulary_summary)


INFO_NAME = "cocotalk.json"
LABEL_NAME = "cocotalk_label.h5"


def prepare_labels(
    karpathy_json: str | os.PathLike,
    out_dir: str | os.PathLike,
    word_count_threshold: int = 5,
    max_length: int = 16,
    images_root: str | os.PathLike | None = None,
    reference_df: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> PreparedPaths:
    """Karpathy split file -> cocotalk.json, cocotalk_label.h5, the CIDEr-D document frequencies (computed
    from the training references, or converted from the reference's coco-train-idxs.p) and references.json,
    the raw captions of the val and test images that validation and `satic eval` score against. Files of
    those names already in out_dir are replaced only with `overwrite` (which also removes a references.json
    this dataset has no images for)."""
    out_dir = check_output_dir(out_dir)
    unfinished = left_unfinished(out_dir, "prepro")
    refuse_existing_in(out_dir, (INFO_NAME, LABEL_NAME, CIDER_DF_NAME, REFERENCES_NAME), overwrite or unfinished)
    if images_root is not None and not Path(images_root).is_dir():
        raise SaticError(f"--images-root {images_root} is not a folder; give the folder the Karpathy file's "
                         "filepath/filename entries are relative to (such as the COCO image root)")
    # everything is read and computed before the first output is written
    images = karpathy_images(karpathy_json)
    counts = word_counts(images)
    vocab = build_vocabulary(images, word_count_threshold, counts)
    labels = encode_captions(images, vocab, max_length)
    if reference_df is not None:
        document_frequency = load_reference_pickle(reference_df)
    else:
        document_frequency = training_document_frequency(images, vocab, karpathy_json)
    references = evaluation_references_file(images, str(karpathy_json))
    info_images = cocotalk_images(images, images_root)
    without_id = [img.get("filename", f"images[{i}]") for i, img in enumerate(images) if image_id_field(img) is None]
    if without_id:  # kept, as the reference's prepro_labels.py, but nothing can read their features
        warnings.warn(f"{karpathy_json}: {len(without_id)} of the {len(images)} images ({first_few(without_id)}) have "
                      "neither 'cocoid' nor 'imgid', so satic train and eval cannot find their features; give each "
                      "image the id its features are stored under (for `satic features extract`, the image file's "
                      "name without its extension)", stacklevel=2)
    paths = PreparedPaths(out_dir / INFO_NAME, out_dir / LABEL_NAME, out_dir / CIDER_DF_NAME,
                          out_dir / REFERENCES_NAME if references is not None else None,
                          vocabulary_summary(counts, word_count_threshold))
    with (user_outputs(True) if unfinished else contextlib.nullcontext(),
          unfinished_set(out_dir, "prepro"),
          staged_outputs() as staged):  # a failure while writing any of them leaves out_dir as it was
        write_label_h5(staged(paths.label_h5), labels)
        write_cocotalk(staged(paths.info_json), vocab, info_images)
        document_frequency.save(staged(paths.cider_df))
        if paths.references is not None:
            write_json(staged(paths.references), references, indent=None)
    if paths.references is None:  # an earlier dataset's references would be taken for this one's
        (out_dir / REFERENCES_NAME).unlink(missing_ok=True)
    return paths
