"""Sequence-level distillation labels: the teacher's beam-search captions replace the training references.

The output is a label file in the reference format (cocotalk_label.h5 layout) for the same
cocotalk.json: every training image (train + restval) gets the teacher's n best captions, best
first, cut at the label length; val and test images keep their human captions. By default n is
the beam size: the reference writes every finished beam of its top beam_size (beam 5 -> 5 label
rows per image, so an image's 5 caption slots in training hold 5 different teacher captions).
Empty teacher captions are dropped; an image whose teacher captions are all empty keeps its
human captions (a label row needs at least one word).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from satic.device import resolve_device
from satic.errors import SaticError
from satic.io import check_output_file, refuse_existing


@dataclass
class DistillReport:
    out: Path
    images: int  # training images captioned by the teacher
    kept_human: int  # training images whose teacher captions were all empty


def teacher_captions(model, data, beam_size: int, batch_size: int, max_length: int, n_best: int,
                     device: torch.device, progress: bool = True, length_penalty: str = "",
                     bad_endings: frozenset[int] = frozenset()) -> dict[int, list[np.ndarray]]:
    """Image index -> the teacher's n_best captions (word ids, cut at the first 0) for the training split.
    bad_endings: word ids cut from a caption's end unless it is made only of them (the reference's
    remove_bad_endings, which its eval.py applies to the text of every beam)."""
    from satic.decoding import DecodeOptions
    from satic.decoding.options import kept_words
    from satic.evaluation.splits import decode_split, model_decode

    options = DecodeOptions(beam_size=beam_size, max_length=max_length, n_best=n_best, length_penalty=length_penalty)
    out: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch, result in decode_split(model_decode(model, device), data, "train", options, batch_size,
                                          progress=progress):
            seq = result.seq.cpu().numpy()  # (B * n_best, T)
            for row, index in enumerate(np.repeat(batch.indices, n_best)):
                words = seq[row]
                end = int(np.argmax(words == 0)) if (words == 0).any() else len(words)
                out.setdefault(int(index), []).append(words[:kept_words(words[:end], bad_endings)])
    return out


def seqkd_label_data(labels, captions: dict[int, list[np.ndarray]]):
    """A LabelData whose images in `captions` get those captions (cut/padded to the label length)."""
    from satic.data.labels import LabelData

    length = labels.seq_length
    rows, starts, ends, kept_human = [], [], [], 0
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
        starts.append(sum(len(r) for r in rows) + 1)
        rows.append(block)
        ends.append(starts[-1] + len(block) - 1)
    all_rows = np.concatenate(rows)  # (M, L)
    data = LabelData(all_rows, np.asarray(starts, dtype=np.uint32), np.asarray(ends, dtype=np.uint32),
                     (all_rows > 0).sum(1).astype(np.uint32))
    return data, kept_human


def make_seqkd_labels(teacher: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
                      features: str | os.PathLike | None = None, beam_size: int = 5, batch_size: int = 50,
                      max_length: int | None = None, n_best: int | None = None, device: str | torch.device = "cpu",
                      progress: bool = True, overwrite: bool = False) -> DistillReport:
    """The teacher's captions of the training images as a label file at `out`, checked before decoding:
    an existing `out` is replaced only with `overwrite`, and never when it is the data's own labels.
    n_best: captions per image (None = beam_size, the reference's labels). max_length: the decode length (None = the
    teacher's, as `satic import-reference` records the reference's max_length, which its eval.py decodes with;
    else 20); its length_penalty and remove_bad_endings, when it records them, apply as well."""
    from satic.data.dataset import CaptionData
    from satic.data.labels import LABEL_NAME, write_label_h5
    from satic.model.checkpoint import load_checkpoint
    from satic.data.synth import FEATURES_NAME

    data_dir = Path(data_dir)
    out = check_output_file(out, "--out")
    if out.exists() and out.resolve() == (data_dir / LABEL_NAME).resolve():
        raise SaticError(f"--out {out} is the label file of {data_dir}, whose human captions the distilled labels "
                         "are made from; write them to a new file, e.g. cocotalk_seq-kd-from-<teacher>_label.h5")
    refuse_existing(out, overwrite, "--out")
    n_best = beam_size if n_best is None else n_best
    if n_best > beam_size:
        raise SaticError(f"--n-best {n_best} is more than --beam-size {beam_size}; beam search returns at most "
                         "beam-size captions per image")
    device = resolve_device(device)
    checkpoint = load_checkpoint(teacher, device)
    # the teacher's decoding options, as the reference's eval.py takes them from its infos (it refuses others)
    defaults = checkpoint.extra.get("decode", {})
    if max_length is None:
        max_length = int(defaults.get("max_length", 20))
    length_penalty = str(defaults.get("length_penalty", "") or "")
    bad_endings = frozenset()
    if defaults.get("remove_bad_endings"):
        from satic.decoding.options import BAD_ENDINGS
        bad_endings = frozenset(i for i, w in enumerate(checkpoint.vocab.words, 1) if w in BAD_ENDINGS)
    data = CaptionData.from_dir(data_dir, features or data_dir / FEATURES_NAME,
                                norm_att_feat=checkpoint.features.norm_att_feat, use_box=checkpoint.features.use_box)
    if checkpoint.vocab != data.vocab:
        raise SaticError(f"the teacher {teacher} was trained with another vocabulary than {data.info_json}; "
                         "distil with a teacher trained on this data")
    captions = teacher_captions(checkpoint.model, data, beam_size, batch_size, max_length, n_best, device, progress,
                                length_penalty, bad_endings)
    labels, kept_human = seqkd_label_data(data.labels, captions)
    write_label_h5(out, labels, replace=overwrite)  # another run to the same --out meanwhile: its file is kept
    return DistillReport(Path(out), len(captions), kept_human)
