"""Sequence-level distillation labels: the teacher's beam-search captions replace the training references.

The output is a label file in the reference format (cocotalk_label.h5 layout) for the same
cocotalk.json: every training image (train + restval) gets the teacher's n best captions, best
first, cut at the label length; val and test images keep their human captions. By default n is
the beam size: the reference writes every finished beam of its top beam_size (beam 5 -> 5 label
rows per image, so an image's 5 caption slots in training hold 5 different teacher captions).
Empty teacher captions are dropped; an image whose teacher captions are all empty keeps its
human captions (a label row needs at least one word).

Labelling COCO's 113,287 training images takes minutes on a GPU and hours on a CPU, so the captions
decoded so far are kept beside the output (OUT.partial.npz) every minute and when the run is stopped
(Ctrl-C, SIGTERM); the same command run again goes on from them, to the same labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from satic.device import resolve_device
from satic.errors import SaticError
from satic.io import (NUMPY_READ_ERRORS, UnusablePartial, atomic_path, check_kept_settings, check_output_file,
                      checkpoint_digest, not_kept_work, refuse_existing, refuse_input_as_output, remove_stale_temps,
                      version_stamp)

PARTIAL_SUFFIX = ".partial.npz"
PARTIAL_ARRAYS = ("settings", "images", "index", "length", "words")  # what save_partial writes
SAVE_EVERY_S = 60.0  # a killed run decodes at most this much again


@dataclass
class DistillReport:
    out: Path
    images: int  # training images captioned by the teacher
    kept_human: int  # training images whose teacher captions were all empty


def teacher_captions(model, data, beam_size: int, batch_size: int, max_length: int, n_best: int,
                     device: torch.device, progress: bool = True, length_penalty: str = "",
                     bad_endings: frozenset[int] = frozenset(), start: int = 0,
                     captions: dict[int, list[np.ndarray]] | None = None,
                     save: Callable[[int, dict, bool], None] | None = None) -> dict[int, list[np.ndarray]]:
    """Image index -> the teacher's n_best captions (word ids, cut at the first 0) for the training split; `model`
    is the teacher, an eval-mode SATModel or a Decoder of it.
    bad_endings: word ids cut from a caption's end unless it is made only of them (the reference's
    remove_bad_endings, which its eval.py applies to the text of every beam). start, captions: go on after the
    split's first `start` images, whose captions are given. save(images, captions, stopped): called every
    SAVE_EVERY_S and when the run is stopped, with how many of the split's images (from its start) are captioned."""
    from satic.decoding import DecodeOptions
    from satic.decoding.options import kept_words
    from satic.evaluation.splits import decode_split, model_decode

    options = DecodeOptions(beam_size=beam_size, max_length=max_length, n_best=n_best, length_penalty=length_penalty)
    out: dict[int, list[np.ndarray]] = {} if captions is None else captions
    images, saved = start, time.monotonic()
    try:
        with torch.no_grad():
            for batch, result in decode_split(model_decode(model, device), data, "train", options, batch_size,
                                              progress=progress, first_image=start):
                seq = result.seq.cpu().numpy()  # (B * n_best, T)
                for row, index in enumerate(np.repeat(batch.indices, n_best)):
                    words = seq[row]
                    end = int(np.argmax(words == 0)) if (words == 0).any() else len(words)
                    out.setdefault(int(index), []).append(words[:kept_words(words[:end], bad_endings)])
                images += len(batch.indices)
                if save is not None and time.monotonic() - saved >= SAVE_EVERY_S:
                    save(images, out, False)
                    saved = time.monotonic()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what is decoded
        if save is not None and images > start:
            save(images, out, True)
        raise
    return out


def partial_path(out: Path) -> Path:
    """Where `satic distill` keeps the captions decoded so far, beside its output."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def kept_by_distill(path: Path) -> bool:
    """Whether `path` holds the arrays save_partial writes, whatever their values: a file of that name that satic
    did not write is neither read nor replaced."""
    try:
        with zipfile.ZipFile(path) as kept:
            return sorted(kept.namelist()) == sorted(f"{name}.npy" for name in PARTIAL_ARRAYS)
    except NUMPY_READ_ERRORS:  # not a zip archive, or a damaged one
        return False


def save_partial(path: Path, settings: dict, done: list[int], captions: dict[int, list[np.ndarray]]) -> None:
    """The captions of the images `done` (a prefix of the training split), with the settings that made them."""
    rows = [(i, c) for i in done for c in captions[i]]
    with atomic_path(path, replace=True) as tmp, open(tmp, "wb") as f:  # this command's own file
        np.savez(f, settings=np.array(json.dumps(settings, sort_keys=True)), images=np.int64(len(done)),
                 index=np.array([i for i, _ in rows], dtype=np.int64),
                 length=np.array([len(c) for _, c in rows], dtype=np.int64),
                 words=np.concatenate([np.zeros(0, np.int64)] + [c.astype(np.int64) for _, c in rows]))


def read_partial(path: Path, settings: dict, split: Sequence[int], vocab_size: int
                 ) -> tuple[int, dict[int, list[np.ndarray]]]:
    """(images captioned, their captions) of an earlier run with these settings over the training split `split`
    (image indices in order); one with other settings, or whose captions are not n_best rows of word ids
    (1..vocab_size) for each of the split's first images, is refused."""
    fix = f"delete {path} or give --overwrite to caption every image afresh"
    try:
        with np.load(path, allow_pickle=False) as f:
            saved, images = json.loads(str(f["settings"])), int(f["images"])
            index, length, words = f["index"], f["length"], f["words"]
        if not isinstance(saved, dict):
            raise TypeError("its settings are not a mapping")
    except (*NUMPY_READ_ERRORS, TypeError) as err:  # damaged, truncated
        raise UnusablePartial(f"{path}: not the captions of an interrupted `satic distill` ({err}); {fix}"
                              ) from None
    check_kept_settings(path, settings, saved, "distill", fix)
    total = len(split)
    whole_batches = images % settings["batch_size"] == 0 or images == total  # saved after a batch
    integers = all(a.ndim == 1 and a.dtype.kind in "iu" for a in (index, length, words))
    if not (0 < images <= total and whole_batches and integers and len(index) == len(length)
            and length.min(initial=0) >= 0 and length.sum() == len(words)
            and np.array_equal(index, np.repeat(split[:images], settings["n_best"]))
            and ((words >= 1) & (words <= vocab_size)).all()):
        raise UnusablePartial(f"{path}: its arrays do not fit together (damaged?); {fix}")
    captions: dict[int, list[np.ndarray]] = {}
    for i, row in zip(index.tolist(), np.split(words.astype(np.int64), np.cumsum(length)[:-1])):
        captions.setdefault(i, []).append(row)
    return images, captions


def run_settings(teacher: Path, data_dir: Path, info_json: Path, features: Path, **options) -> dict:
    """What a partial run's captions depend on: the teacher's files, the data's images and splits (its info
    file), the features (too large to read twice: their path, and the identity and time of change of the store's
    file or folder, which a store written again, or an entry added or removed, changes; not its device number,
    which another mount of the same files has, as a network folder on another machine or after a restart), and
    the decoding options."""
    return {"teacher": checkpoint_digest(teacher), "data": str(data_dir.resolve()),
            "images": hashlib.sha256(info_json.read_bytes()).hexdigest(), "features": str(features.resolve()),
            "features_version": version_stamp(features), **options}


def seqkd_label_data(labels, captions: dict[int, list[np.ndarray]]):
    """A LabelData whose images in `captions` get those captions (cut/padded to the label length)."""
    from satic.data.labels import LabelData

    length = labels.seq_length
    rows, starts, ends, kept_human, count = [], [], [], 0, 0
    for index in range(labels.num_images):
        teacher = [c[:length] for c in captions.get(index, []) if len(c) > 0]
        if index in captions and not teacher:
            kept_human += 1
        if teacher:
            block = np.zeros((len(teacher), length), dtype=np.uint32)
            for j, c in enumerate(teacher):
                block[j, : len(c)] = c
        else:
            block = labels.captions(index).astype(np.uint32)
        starts.append(count + 1)  # 1-based, as the reference's label_start_ix
        rows.append(block)
        count += len(block)
        ends.append(count)
    all_rows = np.concatenate(rows)  # (M, L)
    data = LabelData(all_rows, np.asarray(starts, dtype=np.uint32), np.asarray(ends, dtype=np.uint32),
                     (all_rows > 0).sum(1).astype(np.uint32))
    return data, kept_human


def make_seqkd_labels(teacher: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
                      features: str | os.PathLike | None = None, beam_size: int = 5, batch_size: int = 50,
                      max_length: int | None = None, n_best: int | None = None, device: str | torch.device = "cpu",
                      progress: bool = True, overwrite: bool = False, length_penalty: str | None = None,
                      remove_bad_endings: bool | None = None) -> DistillReport:
    """The teacher's captions of the training images as a label file at `out`, checked before decoding:
    an existing `out` is replaced only with `overwrite`, and never when it is the data's own labels.
    n_best: captions per image (None = beam_size, the reference's labels). max_length: the decode length (None = the
    teacher's, as `satic import-reference` records the reference's max_length, which its eval.py decodes with;
    else 20); length_penalty ('' for none) and remove_bad_endings likewise (None = as the teacher records them)."""
    from satic.data.dataset import CaptionData
    from satic.data.labels import LABEL_NAME, write_label_h5
    from satic.decoding.options import BAD_ENDINGS, recorded_options
    from satic.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
    from satic.data.synth import FEATURES_NAME, GRID_FEATURES_NAME

    data_dir = Path(data_dir)
    out = check_output_file(out, "--out")
    if out.exists() and out.resolve() == (data_dir / LABEL_NAME).resolve():
        raise SaticError(f"--out {out} is the label file of {data_dir}, whose human captions the distilled labels "
                         "are made from; write them to a new file, e.g. cocotalk_seq-kd-from-<teacher>_label.h5")
    refuse_existing(out, overwrite, "--out")
    partial = check_output_file(partial_path(out), "the file of the captions decoded so far", "move it away")
    remove_stale_temps(partial)  # a write of it that a kill cut short
    if partial.exists() and not kept_by_distill(partial):  # --overwrite replaces only what satic wrote
        raise not_kept_work(partial, "distill")
    n_best = beam_size if n_best is None else n_best
    if n_best > beam_size:
        raise SaticError(f"--n-best {n_best} is more than --beam-size {beam_size}; beam search returns at most "
                         "beam-size captions per image")
    device = resolve_device(device)
    checkpoint = load_checkpoint(teacher, device)
    # the teacher's decoding options, as the reference's eval.py takes them from its infos (it refuses others)
    recorded = recorded_options(checkpoint.extra.get("decode", {}), str(teacher))
    if max_length is None:
        max_length = recorded.max_length
    if length_penalty is None:
        length_penalty = recorded.length_penalty
    bad_endings = frozenset()
    if recorded.remove_bad_endings if remove_bad_endings is None else remove_bad_endings:
        bad_endings = frozenset(i for i, w in enumerate(checkpoint.vocab.words, 1) if w in BAD_ENDINGS)
    if features is None:  # the built-in layout's store of the teacher's kind, as `satic eval` picks it
        features = data_dir / (GRID_FEATURES_NAME if checkpoint.features.kind == "grid" else FEATURES_NAME)
    features = Path(features)
    data = CaptionData.from_dir(data_dir, features,
                                norm_att_feat=checkpoint.features.norm_att_feat, use_box=checkpoint.features.use_box)
    # --out --overwrite onto a file the labels are made from would replace it
    read = Path(teacher) / out.name if out.name in (CONFIG_FILE, WEIGHTS_FILE) else None
    inputs = {"--teacher": read, "--data": data.info_json, "--features": features}
    if features.is_dir():  # a file of a folder store
        inputs["--features"] = features / out.name
    refuse_input_as_output(out, inputs)
    if checkpoint.vocab != data.vocab:
        raise SaticError(f"the teacher {teacher} was trained with another vocabulary than {data.info_json}; "
                         "distil with a teacher trained on this data")
    if data.feature_dim != checkpoint.config.att_feat_size:
        raise SaticError(f"the features in {data.store.path} have {data.feature_dim} numbers per region but the "
                         f"teacher {teacher} was trained on {checkpoint.config.att_feat_size}-dim "
                         f"{checkpoint.features.kind} features; give --features of that kind, or a teacher trained on "
                         "these")
    split = data.split_indices("train")
    settings = run_settings(Path(teacher), data_dir, Path(data.info_json), features, beam_size=beam_size, n_best=n_best,
                            max_length=max_length, length_penalty=length_penalty, bad_endings=sorted(bad_endings),
                            batch_size=batch_size, train_images=len(split))
    start, captions = 0, None
    if partial.exists() and not overwrite:
        start, captions = read_partial(partial, settings, split, len(data.vocab))
        print(f"going on from {partial}: {start} of {len(split)} training images captioned", file=sys.stderr)

    def save(images: int, decoded: dict, stopped: bool) -> None:
        save_partial(partial, settings, split[:images], decoded)
        if stopped:
            print(f"kept the captions of {images} of {len(split)} training images in {partial}; the same command "
                  "goes on from them", file=sys.stderr)

    # decoded by the engine `satic eval` decodes with (as the reference made its labels with its eval.py): on the
    # CPU the native beam search, 1.5-1.6x the Python loop over the bare model at the demo's size
    from satic.decoding.engine import Decoder

    teacher_decoder = Decoder.prepare(checkpoint.model.eval(), "fp32", device, compile=True)
    captions = teacher_captions(teacher_decoder, data, beam_size, batch_size, max_length, n_best, device, progress,
                                length_penalty, bad_endings, start=start, captions=captions, save=save)
    labels, kept_human = seqkd_label_data(data.labels, captions)
    write_label_h5(out, labels, replace=overwrite)  # another run to the same --out meanwhile: its file is kept
    partial.unlink(missing_ok=True)
    return DistillReport(Path(out), len(captions), kept_human)
