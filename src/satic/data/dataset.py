"""Batches of images with seq_per_img captions each, deterministic and exactly resumable.

A split is read as an endless stream of images: epoch e visits the split in the order of a
permutation drawn from (seed, e), and batch k holds stream positions k*B .. k*B+B-1, so a
batch may span two epochs, as in the reference loader. Everything random about a position
(its epoch's order and the choice of its captions) is a pure function of the seed and the
position, so a batch is a pure function of (seed, k): DataLoader workers need no shared
state, and `state_dict()` only has to remember k.

Caption choice follows the reference: an image with fewer captions than seq_per_img draws
them with replacement; otherwise a random window of seq_per_img consecutive captions.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from satic.data.labels import (INFO_NAME, LABEL_NAME, SPLIT_MEMBERS, check_labels_match, read_cocotalk,
                               read_label_h5)
from satic.data.stores import BOX_GEOMETRY, FeatureStore, open_store, prepare_regions
from satic.errors import SaticError

@dataclass
class Batch:
    att_feats: torch.Tensor  # (B, N, D) float32, zero padded
    att_masks: torch.Tensor  # (B, N) bool, True for real regions
    labels: torch.Tensor  # (B*S, L+2) long: [0, w1..wT, 0, ...]
    masks: torch.Tensor  # (B*S, L+2) float: 1 for positions 0..T+1
    gts: list[np.ndarray]  # B arrays (n_i, L) int64: every reference caption of each image
    image_ids: list  # B ids as in cocotalk.json
    indices: list[int]  # B positions in cocotalk.json's image list
    epoch: int  # the epoch of the batch's first image
    wrapped: bool  # the batch holds the last image of an epoch

    def __len__(self) -> int:
        return len(self.image_ids)


class CaptionData:
    """A prepared dataset: vocabulary, labels and region features, with the reference's options."""

    def __init__(
        self,
        info_json: str | os.PathLike,
        label_h5: str | os.PathLike,
        features: str | os.PathLike | FeatureStore,
        norm_att_feat: bool = False,
        use_box: bool = False,
    ):
        self.info_json, self.label_h5 = Path(info_json), Path(label_h5)
        self.vocab, self.images = read_cocotalk(info_json)
        self.labels = read_label_h5(label_h5)
        check_labels_match(self.labels, self.images, len(self.vocab), label_h5, info_json)
        self.store = features if isinstance(features, FeatureStore) else open_store(features)
        self.norm_att_feat, self.use_box = norm_att_feat, use_box
        self.split_ix = {name: [i for i, img in enumerate(self.images) if img["split"] in members]
                         for name, members in SPLIT_MEMBERS.items()}
        # as the reference's loader (train_only=0), an image of any other split, such as a name the reference's
        # prepro_labels.py copied through from the Karpathy file, is a training image
        held_out = {split for name in ("val", "test") for split in SPLIT_MEMBERS[name]}
        self.split_ix["train"] = [i for i, img in enumerate(self.images) if img["split"] not in held_out]
        self._check_ids()

    @classmethod
    def from_dir(
        cls,
        data_dir: str | os.PathLike,
        features: str | os.PathLike,
        label_h5: str | os.PathLike | None = None,
        **options,
    ) -> "CaptionData":
        """From `satic prepro`'s output directory; `label_h5` overrides its labels (e.g. seq-KD labels)."""
        data_dir = Path(data_dir)
        return cls(data_dir / INFO_NAME, label_h5 or data_dir / LABEL_NAME, features, **options)

    def _check_ids(self) -> None:
        no_id = [i for i, img in enumerate(self.images) if "id" not in img]
        if no_id:
            raise SaticError(f"{self.info_json}: images[{no_id[0]}] has no 'id' (the Karpathy file gave it neither "
                             "'cocoid' nor 'imgid'); add ids to the split file and re-run `satic prepro`")
        first: dict[str, int] = {}
        for i, img in enumerate(self.images):
            j = first.setdefault(str(img["id"]), i)
            if j != i:  # one id finds one image's features, and scores one caption against one image's references
                raise SaticError(f"{self.info_json}: images[{j}] and images[{i}] both have id {img['id']!r}; give "
                                 "every image its own id in the split file and re-run `satic prepro`")
        stored = self.store.ids()
        known = set(stored)
        missing = [str(img["id"]) for img in self.images if str(img["id"]) not in known]
        if missing:
            holds = (f"; the store holds other ids (e.g. {stored[:3]}): an image's features are found by its "
                     "id (cocoid, else imgid, in the Karpathy file), which for `satic features extract` is the image "
                     "file's name without its extension" if len(missing) == len(self.images) and stored else "")
            raise SaticError(f"feature store {self.store.path} lacks {len(missing)} of the {len(self.images)} images "
                             f"of {self.info_json} (e.g. {missing[:3]}); extract or import features for them{holds}"
                             f"{self.store.missing_note(missing)}")
        if self.use_box and any("width" not in img or "height" not in img for img in self.images):
            raise SaticError(f"use_box needs image sizes in {self.info_json}: run `satic prepro --images-root DIR`")
        if self.use_box:  # box geometry divides by them
            for i, img in enumerate(self.images):
                bad = next((k for k in ("width", "height") if not _is_size(img[k])), None)
                if bad:
                    raise SaticError(f"{self.info_json}: images[{i}] (id {img['id']!r}) has {bad} "
                                     f"{json.dumps(img[bad])}; use_box needs each image's width and height in pixels "
                                     "(positive numbers): run `satic prepro --images-root DIR`")

    @property
    def seq_length(self) -> int:
        return self.labels.seq_length

    @property
    def feature_dim(self) -> int:
        """Size of one region vector as batches hold it (BOX_GEOMETRY more with use_box)."""
        return self.store.feature_dim + (BOX_GEOMETRY if self.use_box else 0)

    def split_indices(self, split: str) -> list[int]:
        if split not in self.split_ix:
            raise SaticError(f"unknown split {split!r}; choose one of {list(self.split_ix)}")
        if not self.split_ix[split]:
            raise SaticError(f"{self.info_json} has no images in split {split!r}")
        return self.split_ix[split]

    def regions(self, index: int) -> np.ndarray:
        """(N, D) float32 region features of image `index` with the load-time options applied."""
        img = self.images[index]
        att, boxes = self.store.checked_entry(img["id"], self.use_box)
        size = (img["width"], img["height"]) if self.use_box else None
        return prepare_regions(att, boxes, size, self.norm_att_feat, self.use_box)

    def sample_captions(self, index: int, seq_per_img: int, rng: np.random.Generator) -> np.ndarray:
        """(seq_per_img, L) label rows of image `index`, chosen as the reference does."""
        captions = self.labels.captions(index)  # (n, L)
        n = len(captions)
        if n < seq_per_img:
            return captions[rng.integers(0, n, size=seq_per_img)]
        start = int(rng.integers(0, n - seq_per_img + 1))
        return captions[start:start + seq_per_img]

    def collate(self, indices: list[int], rngs: list[np.random.Generator], seq_per_img: int,
                epoch: int = 0, wrapped: bool = False) -> Batch:
        feats = [self.regions(i) for i in indices]
        captions = np.concatenate([self.sample_captions(i, seq_per_img, r) for i, r in zip(indices, rngs)])  # (B*S, L)
        att_feats, att_masks = pad_regions(feats)
        labels, masks = label_rows(captions)
        return Batch(
            att_feats=torch.from_numpy(att_feats),
            att_masks=torch.from_numpy(att_masks),
            labels=torch.from_numpy(labels),
            masks=torch.from_numpy(masks),
            gts=[self.labels.captions(i).astype(np.int64) for i in indices],
            image_ids=[self.images[i]["id"] for i in indices],
            indices=list(indices),
            epoch=epoch,
            wrapped=wrapped,
        )


def _is_size(value) -> bool:
    """A width or height in pixels: a positive, finite number (not a bool)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int past float's range
        return False


def pad_regions(feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """B arrays (N_i, D) -> zero-padded (B, N, D) float32 and (B, N) bool mask, N = max N_i."""
    n = max(f.shape[0] for f in feats)
    out = np.zeros((len(feats), n, feats[0].shape[1]), dtype=np.float32)  # (B, N, D)
    mask = np.zeros((len(feats), n), dtype=bool)  # (B, N)
    for b, f in enumerate(feats):
        out[b, : len(f)] = f
        mask[b, : len(f)] = True
    return out, mask


def label_rows(captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, L) zero-padded captions -> labels (M, L+2) [0, w.., 0..] int64 and masks (M, L+2) float32
    that are 1 for positions 0..T+1 (BOS, the T words and the end token)."""
    m, length = captions.shape
    labels = np.zeros((m, length + 2), dtype=np.int64)
    labels[:, 1:length + 1] = captions
    lengths = (captions != 0).sum(1) + 2  # (M,)
    masks = (np.arange(length + 2)[None, :] < lengths[:, None]).astype(np.float32)  # (M, L+2)
    return labels, masks


class _StreamBatches(Dataset):
    """Batch k of a split's image stream: a pure function of (seed, k)."""

    def __init__(self, data: CaptionData, split: str, batch_size: int, seq_per_img: int, seed: int,
                 shuffle: bool, limit: int | None = None):
        if batch_size < 1 or seq_per_img < 1:
            raise SaticError(f"batch_size and seq_per_img must be positive, got {batch_size} and {seq_per_img}")
        self.data, self.split = data, split
        self.split_ix = np.asarray(data.split_indices(split))
        self.batch_size, self.seq_per_img, self.seed, self.shuffle = batch_size, seq_per_img, seed, shuffle
        self.limit = limit  # stream positions >= limit do not exist (one pass over a prefix)
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The split's image indices in the order epoch `epoch` visits them: the first epoch in file order,
        as the reference's loader, which shuffles only when it wraps round; each later epoch shuffled."""
        if not self.shuffle or epoch == 0:
            return self.split_ix
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a batch spans at most two epochs
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.split_ix)
        return self._orders[epoch]

    def positions(self, k: int) -> range:
        end = (k + 1) * self.batch_size
        return range(k * self.batch_size, end if self.limit is None else min(end, self.limit))

    def __getitem__(self, k: int) -> Batch:
        n = len(self.split_ix)
        positions = self.positions(k)
        indices = [int(self.order(p // n)[p % n]) for p in positions]
        rngs = [np.random.default_rng([self.seed, p // n, p % n, 1]) for p in positions]
        wrapped = any(p % n == n - 1 for p in positions)
        try:
            return self.data.collate(indices, rngs, self.seq_per_img, epoch=positions[0] // n, wrapped=wrapped)
        except SaticError as err:
            if torch.utils.data.get_worker_info() is None:
                raise
            # in a loader worker: handed to the main process as the batch, which raises it there (raised here,
            # torch would raise it there with this worker's whole traceback in its message)
            return err

    def __len__(self) -> int:
        if self.limit is None:
            raise TypeError("an endless stream has no length")
        return -(-self.limit // self.batch_size)


class _From(Sampler):
    """Batch numbers start, start+1, ... (endless unless `stop`)."""

    def __init__(self, start: int, stop: int | None = None):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(count(self.start) if self.stop is None else range(self.start, self.stop))


def _one(batch: Batch) -> Batch:
    return batch


def _own_process_group(worker_id: int) -> None:
    """A worker leaves its main process's group: SIGINT and SIGTERM sent to the whole group (Ctrl-C in a
    terminal, torchrun stopping its ranks) would kill it (torch's handler) and fail the main process mid-step,
    before it could save where it stopped. The main process ends its workers itself (or they end with it)."""
    os.setpgid(0, 0)


# an AF_UNIX socket's path, its final NUL included, holds 108 bytes on Linux and 104 on macOS
SOCKET_PATH_MAX = 104
SOCKET_NAME = "/listener-12345678"  # multiprocessing's socket in its folder (tempfile's 8 random letters)
SHORT_TEMPORARY_FOLDERS = ("/tmp", "/var/tmp", "/usr/tmp")


def _holds_sockets(folder: str) -> bool:
    return len(os.fsencode(folder + SOCKET_NAME)) < SOCKET_PATH_MAX


def _short_socket_folder() -> None:
    """Workers hand their batches' tensors over through a socket in multiprocessing's temporary folder (pymp-*, made
    under $TMPDIR once per process, and inherited by the forked workers). A socket path too long for an AF_UNIX
    address cannot be made, and the batch never arrives: the run would wait for it for ever. Under a long $TMPDIR
    (a cluster job's, say) the folder is made in the system's own short temporary folder instead."""
    import multiprocessing.util
    import tempfile

    if not _holds_sockets(os.path.join(tempfile.gettempdir(), "pymp-12345678")):
        saved = tempfile.tempdir
        tempfile.tempdir = next((folder for folder in SHORT_TEMPORARY_FOLDERS
                                 if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)), saved)
        try:
            multiprocessing.util.get_temp_dir()  # made now, before the workers are forked (once made, it is kept)
        finally:
            tempfile.tempdir = saved
    folder = multiprocessing.util.get_temp_dir()
    if not _holds_sockets(folder):
        raise SaticError(f"the data loader's workers pass batches through a socket in {folder}, a path too long for "
                         f"one; set TMPDIR to a shorter folder, or data.num_workers=0")


def _batches(dataset: _StreamBatches, start: int, stop: int | None, num_workers: int) -> Iterable[Batch]:
    dataset.data.store.close()  # workers must not inherit open file handles; they reopen their own
    if num_workers > 0:
        _short_socket_folder()
    return DataLoader(dataset, batch_size=None, sampler=_From(start, stop), collate_fn=_one,
                      num_workers=num_workers, worker_init_fn=_own_process_group)


def _raise_refused(batch: Batch | SaticError) -> None:
    """A loader worker hands over the SaticError its batch's data raised (_StreamBatches.__getitem__) as the batch."""
    if isinstance(batch, SaticError):
        raise batch


class CaptionLoader:
    """Endless batches of a split: the first epoch in file order, each later one reshuffled (as the
    reference's loader); `state_dict()` resumes exactly."""

    def __init__(self, data: CaptionData, split: str = "train", batch_size: int = 10, seq_per_img: int = 5,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0):
        self.dataset = _StreamBatches(data, split, batch_size, seq_per_img, seed, shuffle)
        self.num_workers = num_workers
        self.next_batch = 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in _batches(self.dataset, self.next_batch, None, self.num_workers):
            _raise_refused(batch)
            self.next_batch += 1
            yield batch

    @property
    def epoch(self) -> int:
        """Completed epochs: how many times the whole split has been handed out."""
        return self.next_batch * self.dataset.batch_size // len(self.dataset.split_ix)

    def state_dict(self) -> dict:
        d = self.dataset
        return {"split": d.split, "seed": d.seed, "batch_size": d.batch_size, "seq_per_img": d.seq_per_img,
                "shuffle": d.shuffle, "num_images": len(d.split_ix), "next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch handed out when `state` was saved (same data and settings)."""
        mine = self.state_dict()
        differ = [k for k in mine if k != "next_batch" and state.get(k) != mine[k]]
        next_batch = state.get("next_batch")
        if isinstance(next_batch, bool) or not isinstance(next_batch, int) or next_batch < 0:  # no batch position
            differ.append("next_batch")
        if differ:
            now = {**mine, "next_batch": "a whole number >= 0"}
            raise SaticError(f"loader state does not match this loader ({', '.join(differ)} differ: "
                             f"saved {[state.get(k) for k in differ]}, now {[now[k] for k in differ]}); "
                             "resume with the same data, split, seed, batch size and seq_per_img")
        self.next_batch = next_batch


def iterate_split(data: CaptionData, split: str, batch_size: int = 10, seq_per_img: int = 5,
                  max_images: int | None = None, num_workers: int = 0, seed: int = 0, first_image: int = 0
                  ) -> Iterator[Batch]:
    """One pass over a split in file order (for validation and evaluation), at most max_images, from its
    first_image (a multiple of batch_size: the batches are those of a pass from the start)."""
    n = len(data.split_indices(split))
    limit = n if max_images is None or max_images < 0 else min(n, max_images)
    if first_image % batch_size and first_image < limit:
        raise ValueError(f"first_image {first_image} is not a multiple of batch_size {batch_size}")
    dataset = _StreamBatches(data, split, batch_size, seq_per_img, seed, shuffle=False, limit=limit)
    for batch in _batches(dataset, -(-first_image // batch_size), len(dataset), num_workers):
        _raise_refused(batch)
        yield batch
