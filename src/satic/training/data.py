"""The data side of a run: the built-in dataset when asked, the loaders, and the reward scorers."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from satic.errors import SaticError, first_few
from satic.training.config import DataConfig


def features_path(config: DataConfig) -> Path:
    from satic.data.synth import FEATURES_NAME

    return Path(config.features) if config.features else Path(config.dir) / FEATURES_NAME


def ensure_builtin(config: DataConfig) -> None:
    """Make and prepare the built-in dataset in data.dir when `data.builtin` is set and it is absent."""
    from satic.data.labels import INFO_NAME

    if config.builtin is None or (Path(config.dir) / INFO_NAME).is_file():
        return
    from satic.data.synth import BUILTIN_OUTPUTS, prepare_builtin

    from satic.io import unfinished_marker

    b = config.builtin
    found = [name for name in BUILTIN_OUTPUTS if (Path(config.dir) / name).exists()]
    killed = unfinished_marker(Path(config.dir), "synth").is_file()  # what it left, prepare_builtin replaces
    if found and not killed:  # another dataset, or one whose making was stopped: never replaced unasked
        raise SaticError(f"data.dir {config.dir} has no {INFO_NAME} but holds {', '.join(found)}, so data.builtin "
                         f"cannot make the built-in dataset there; remake it with `satic synth {config.dir} --images "
                         f"{b.images} --seed {b.seed} --feature-dim {b.feature_dim} --overwrite`, or give another "
                         "data.dir")
    print(f"making the built-in dataset in {config.dir} ({b.images} images, features of size {b.feature_dim})")
    prepare_builtin(config.dir, images=b.images, seed=b.seed, feature_dim=b.feature_dim, progress=True)


def bleu4_scorer(candidates: np.ndarray, references: Sequence[np.ndarray]) -> np.ndarray:
    """Per-candidate BLEU-4 of token-id strings, as the reference's BLEU reward (coco toolkit's Bleu)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    per = len(candidates) // len(references)
    scorer = BleuScorer(n=4)
    for i, cand in enumerate(candidates):
        scorer += (_token_string(cand), [_token_string(r) for r in references[i // per]])
    _, per_sentence = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_sentence[3], dtype=np.float64)


def _token_string(tokens: np.ndarray) -> str:
    """Ids up to and including the first 0, space separated (the reference's array_to_str)."""
    out = []
    for t in tokens:
        out.append(str(int(t)))
        if t == 0:
            break
    return " ".join(out)


@dataclass
class RunData:
    """What the trainer needs from the data: vocabulary, loaders and scorers."""

    captions: object  # satic.data.dataset.CaptionData
    train: object  # satic.data.dataset.CaptionLoader over the training split
    features: object  # satic.model.checkpoint.FeatureSpec saved with every checkpoint
    cider: object  # CiderD.score_token_ids with the training document frequencies
    bleu: object | None  # BLEU-4 scorer when the reward uses it
    _stream: Iterator | None = None
    stopping: bool = False  # the run was told to stop: it finishes its step, then saves

    @property
    def vocab(self):
        return self.captions.vocab

    @property
    def feature_dim(self) -> int:
        return self.captions.feature_dim

    @property
    def train_images(self) -> int:
        return len(self.captions.split_indices("train"))

    def next_train_batch(self):
        """The next training batch; loading never draws from the global RNG (torch's DataLoader seeds
        itself from it when its iterator starts), so a resumed run sees the same dropout and samples."""
        with torch.random.fork_rng(devices=[]):
            if self._stream is None:
                self._stream = iter(self.train)
            try:
                return next(self._stream)
            except Exception:  # noqa: BLE001 - a loader worker gone (RuntimeError, or the socket of a batch reset)
                if not self.stopping or not self.train.num_workers:
                    raise
                # stopped with the run (a job scheduler signals every process of a job): the batch the step being
                # finished needs is made here, the same batch, from the loader's position (an error of the data
                # itself comes again)
                self.train.num_workers = 0
                self._stream = iter(self.train)
                return next(self._stream)

    def close(self) -> None:
        """End the loader's worker processes now, as a finished epoch does. Left to the interpreter's exit, a
        stopped run's workers are killed, which leaves their temporary folders (pymp-*) behind."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def open_training_data(config: DataConfig, seed: int, bleu: bool = False) -> RunData:
    from satic.data.dataset import CaptionData, CaptionLoader
    from satic.data.extract import store_feature_spec
    from satic.evaluation.cider import CiderD
    from satic.evaluation.document_frequency import DEFAULT_FILENAME, load_document_frequency

    data_dir = Path(config.dir)
    if not data_dir.is_dir():
        raise SaticError(f"data.dir={data_dir} does not exist; run `satic prepro` (or `satic synth`) first, "
                         "or set data.builtin to make the built-in dataset")
    if not config.features and not features_path(config).exists():  # a folder of one's own, not the built-in one
        raise SaticError(f"data.features is unset and data.dir={data_dir} has no built-in {features_path(config).name} "
                         "store; set data.features to the region features of these images (e.g. the --out of "
                         "`satic features extract`)")
    captions = CaptionData.from_dir(data_dir, features_path(config), config.labels,
                                    norm_att_feat=config.norm_att_feat, use_box=config.use_box)
    loader = CaptionLoader(captions, "train", config.batch_size, config.seq_per_img, seed=seed,
                           num_workers=config.num_workers)
    df_path = Path(config.cider_df) if config.cider_df else data_dir / DEFAULT_FILENAME
    document_frequency = load_document_frequency(df_path)
    check_reward_words(document_frequency, len(captions.vocab), df_path, captions.info_json)
    scorer = CiderD(document_frequency)
    features = store_feature_spec(features_path(config), config.norm_att_feat, config.use_box)
    return RunData(captions, loader, features, scorer.score_token_ids, bleu4_scorer if bleu else None)


def check_reward_words(document_frequency, vocab_size: int, df_path: Path, info_json: Path) -> None:
    """The rewards score captions as word indices ("0" the end, "1".."V" the words), as the CIDEr-D statistics of
    `satic prepro` and the reference's coco-train-idxs.p hold them: a table of other words (the reference's
    coco-train-words.p, or another vocabulary's indices) would find no sampled n-gram, and every reward be wrong;
    so would a table of no n-grams, which no training caption gives."""
    from satic.evaluation.cider import is_token_word

    if not len(document_frequency):
        raise SaticError(f"{df_path}: the CIDEr-D statistics hold no n-grams; give data.cider_df the statistics of "
                         "these captions (the cider_df.json `satic prepro` wrote with this cocotalk.json)")
    foreign = [w for w in document_frequency.words if not (is_token_word(w) and int(w) <= vocab_size)]
    if foreign:
        raise SaticError(f"{df_path}: the CIDEr-D statistics hold words that are no word index of {info_json} "
                         f"(0..{vocab_size}): {first_few(map(repr, foreign))}; give data.cider_df the statistics of "
                         "these captions (the cider_df.json `satic prepro` wrote with this cocotalk.json, or the "
                         "reference's coco-train-idxs.p made with its vocabulary)")


def slice_batch(batch, start: int, end: int):
    """Images [start, end) of a batch with their caption rows (one rank's share)."""
    per_image = batch.labels.size(0) // len(batch.image_ids)
    rows = slice(start * per_image, end * per_image)
    return replace(
        batch, att_feats=batch.att_feats[start:end], att_masks=batch.att_masks[start:end],
        labels=batch.labels[rows], masks=batch.masks[rows],
        gts=batch.gts[start:end], image_ids=batch.image_ids[start:end], indices=batch.indices[start:end],
    )


def batch_to(batch, device):
    """The tensors of a batch on `device` (gts and ids stay on the host)."""
    return replace(batch, att_feats=batch.att_feats.to(device), att_masks=batch.att_masks.to(device),
                   labels=batch.labels.to(device), masks=batch.masks.to(device))
