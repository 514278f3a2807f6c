"""Validation during training: caption a split and score it, as the reference picks its best checkpoint.

The reference scores its validation captions with coco-caption against the raw captions of
captions_val2014.json (PTB-tokenized, every word, document frequencies from those references) and
keeps the checkpoint with the best CIDEr. satic does the same when it has raw references (eval.references,
or the data folder's references.json / dataset.json). Without them it scores CIDEr-D against the label
file's captions with the training document frequencies, and says so once.

Like the reference's eval_split, validation also reports the loss: the training criterion (with its label
smoothing, without distillation) on seq_per_img label captions of each validated image, teacher-forced
with dropout off; the mean, over batches of data.batch_size images in file order (the reference
validates in training-size batches), of each batch's mean per word.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from satic.decoding.options import without_bad_endings
from satic.errors import SaticError
from satic.training.config import EvalConfig
from satic.training.distributed import World, shard_bounds

RAW_METRIC = "CIDEr"  # the toolkit's CIDEr against the raw references, the reference's lang_stats['CIDEr']
LABEL_METRIC = "CIDEr-D"  # against the label file's captions, with the training document frequencies


@dataclass
class ValidationReferences:
    """The raw references of the validated images, tokenized once for the whole run."""

    path: Path
    raw: dict  # image id -> raw captions
    tokenized: dict  # image id -> PTB-tokenized captions


def validation_image_ids(captions, config: EvalConfig) -> list:
    """Ids of the images validation decodes: the split's first max_images, in file order."""
    from satic.evaluation.splits import split_image_ids

    try:
        return split_image_ids(captions, config.split, config.max_images)
    except SaticError as err:  # a dataset of one's own may have put every image in train
        raise SaticError(f"eval.split={config.split}: {err}; validate on another split (eval.split), or give some "
                         "images that split in the Karpathy file and run satic prepro again") from None


def load_validation_references(captions, config: EvalConfig, data_dir: str | Path) -> ValidationReferences | None:
    """The raw references of the validated images, or None when eval.references is unset and no data-folder
    reference file has them all; an eval.references file that lacks some of them is an error."""
    from satic.evaluation.metrics import tokenize
    from satic.evaluation.results import find_references

    ids = validation_image_ids(captions, config)
    try:
        found = find_references(data_dir, ids, config.references,
                                f"set eval.references to the raw captions of the {config.split} split "
                                "(e.g. dataset_coco.json)")
    except SaticError as err:
        raise SaticError(f"eval.references: {err}") from None
    if found is None:
        return None
    path, raw = found
    return ValidationReferences(path, raw, tokenize(raw))


def selection_metric(references: ValidationReferences | None) -> str:
    """The validation metric that picks best/ (higher is better)."""
    return RAW_METRIC if references is not None else LABEL_METRIC


@dataclass
class SplitPass:
    """One validation pass over the split (or one process's share of it): the decoded captions and the loss."""

    ids: list  # image ids, in file order
    seqs: list[np.ndarray]  # (T,) decoded words of each image
    refs: list[np.ndarray]  # (M, L) label captions of each image
    sums: np.ndarray  # (images,) summed per-word loss of each image's label captions
    counts: np.ndarray  # (images,) how many words those are

    def loss(self, loss_batch: int = 10) -> float:
        """The mean over batches of loss_batch images of each batch's per-word loss of its label captions."""
        sums, counts = self.sums, self.counts
        return float(np.mean([sums[i:i + loss_batch].sum() / counts[i:i + loss_batch].sum()
                              for i in range(0, len(sums), loss_batch)]))

    @staticmethod
    def join(parts: list["SplitPass"]) -> "SplitPass":
        """The shares of consecutive images, in order, as one pass."""
        return SplitPass([i for p in parts for i in p.ids], [s for p in parts for s in p.seqs],
                         [r for p in parts for r in p.refs], np.concatenate([p.sums for p in parts]),
                         np.concatenate([p.counts for p in parts]))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the block, then the model's mode as it was, also when the block fails."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def caption_split(model, data, config: EvalConfig, device: torch.device, seq_per_img: int = 5,
                  smoothing: float = 0.0, world: World = World()) -> SplitPass:
    """Decode every image of the split (at most max_images) in batches of eval.batch_size, and score
    seq_per_img of each image's label captions teacher-forced in the same batches. Under torchrun each process
    takes a run of whole batches (`world`), so that every image is decoded in the batch one process would put
    it in, and gets this share only."""
    from satic.evaluation.splits import decode_split, model_decode, split_image_ids
    from satic.training.losses import row_cross_entropy

    batches = -(-len(split_image_ids(data.captions, config.split, config.max_images)) // config.batch_size)
    first, stop = (config.batch_size * bound for bound in shard_bounds(batches, world))
    if config.max_images is not None and config.max_images >= 0:
        stop = min(stop, config.max_images)
    options = config.decode_options()
    ids, seqs, refs, sums, counts = [], [], [], [], []
    with eval_mode(model):
        for batch, result in decode_split(model_decode(model, device), data.captions, config.split, options,
                                          config.batch_size, stop, seq_per_img=seq_per_img, first_image=first):
            feats, masks, labels = batch.att_feats.to(device), batch.att_masks.to(device), batch.labels.to(device)
            ids += batch.image_ids
            seqs += list(result.seq.cpu().numpy())
            refs += batch.gts
            logprobs = model(feats, masks, labels[:, :-1]).float()  # (B * seq_per_img, L+1, V+1)
            total, count = row_cross_entropy(logprobs, labels[:, 1:], batch.masks[:, 1:].to(device), smoothing)
            sums += total.view(-1, seq_per_img).sum(1).tolist()  # per image
            counts += count.view(-1, seq_per_img).sum(1).tolist()
    return SplitPass(ids, seqs, refs, np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64))


def validate(model, data, config: EvalConfig, device: torch.device,
             references: ValidationReferences | None = None, seq_per_img: int = 5,
             smoothing: float = 0.0, loss_batch: int = 10, world: World = World()) -> dict[str, float] | None:
    """{'loss' (see the module's docstring); 'CIDEr-D' against the label file's captions; with raw references
    the toolkit's 'CIDEr' against them; with all_metrics the toolkit's other metrics too (against the raw
    references when there are some)}. Under torchrun every process calls it and decodes its share of the
    split (caption_split); rank 0 scores the whole and returns the metrics, the others None."""
    from satic.evaluation.metrics import Cider, coco_metrics, tokenize

    done = caption_split(model, data, config, device, seq_per_img, smoothing, world)
    if world.size > 1:
        done = gather_to_rank_0(done, world)
        if done is None:
            return None
    ids, seqs, refs = done.ids, done.seqs, done.refs
    width = max(len(s) for s in seqs)
    candidates = np.stack([np.pad(s, (0, width - len(s))) for s in seqs])  # (B, T)
    metrics = {"loss": done.loss(loss_batch), LABEL_METRIC: float(np.mean(data.cider(candidates, refs)))}
    vocab = data.vocab
    res = {i: [vocab.decode(s)] for i, s in zip(ids, seqs)}
    if config.remove_bad_endings:  # the text the toolkit scores, as the reference's decode_sequence gives it
        res = {i: [without_bad_endings(c) for c in captions] for i, captions in res.items()}
    if config.all_metrics and references is not None:
        overall, _ = coco_metrics(references.raw, res, gts_tokenized=references.tokenized)
        metrics.update(overall)
    elif config.all_metrics:
        overall, _ = coco_metrics({i: [vocab.decode(r) for r in ref] for i, ref in zip(ids, refs)}, res)
        metrics.update(overall)
    elif references is not None:
        score, _ = Cider().compute_score(references.tokenized, tokenize(res))
        metrics[RAW_METRIC] = float(score)
    return metrics


def gather_to_rank_0(share: SplitPass, world: World) -> SplitPass | None:
    """Every process's share of the split, joined in rank order (which is file order) on rank 0; None elsewhere."""
    import torch.distributed as dist

    shares = [None] * world.size if world.is_main else None
    dist.gather_object(share, shares, dst=0)
    return SplitPass.join(shares) if world.is_main else None
