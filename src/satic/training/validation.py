"""Validation during training: caption a split and score it, as the reference picks its best checkpoint.

The reference scores its validation captions with coco-caption against the raw captions of
captions_val2014.json (PTB-tokenized, every word, document frequencies from those references) and
keeps the checkpoint with the best CIDEr. satic does the same when it has raw references (eval.references,
or the data folder's references.json / dataset.json). Without them it scores CIDEr-D against the label
file's captions with the training document frequencies, and says so once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from satic.decoding.options import without_bad_endings
from satic.errors import SaticError
from satic.training.config import EvalConfig

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
    indices = captions.split_indices(config.split)
    if config.max_images > 0:
        indices = indices[: config.max_images]
    return [captions.images[i]["id"] for i in indices]


def load_validation_references(captions, config: EvalConfig, data_dir: str | Path) -> ValidationReferences | None:
    """The raw references of the validated images, or None when eval.references is unset and no data-folder
    reference file has them all; an eval.references file that lacks some of them is an error."""
    from satic.evaluation.metrics import tokenize
    from satic.evaluation.results import find_references

    try:
        found = find_references(data_dir, validation_image_ids(captions, config), config.references,
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


@torch.no_grad()
def caption_split(model, data, config: EvalConfig, device: torch.device) -> tuple[list, list[np.ndarray], list[np.ndarray]]:
    """Decode every image of the split (at most max_images) -> (image ids, seqs (T,), references (M, L))."""
    from satic.evaluation.splits import decode_split, model_decode

    options = config.decode_options()
    was_training = model.training
    model.eval()
    ids, seqs, refs = [], [], []
    for batch, result in decode_split(model_decode(model, device), data.captions, config.split, options,
                                      config.batch_size, config.max_images):
        ids += batch.image_ids
        seqs += list(result.seq.cpu().numpy())
        refs += batch.gts
    model.train(was_training)
    return ids, seqs, refs


def validate(model, data, config: EvalConfig, device: torch.device,
             references: ValidationReferences | None = None) -> dict[str, float]:
    """{'CIDEr-D' against the label file's captions; with raw references the toolkit's 'CIDEr' against them;
    with all_metrics the toolkit's other metrics too (against the raw references when there are some)}."""
    from satic.evaluation.metrics import Cider, coco_metrics, tokenize

    ids, seqs, refs = caption_split(model, data, config, device)
    width = max(len(s) for s in seqs)
    candidates = np.stack([np.pad(s, (0, width - len(s))) for s in seqs])  # (B, T)
    metrics = {LABEL_METRIC: float(np.mean(data.cider(candidates, refs)))}
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
