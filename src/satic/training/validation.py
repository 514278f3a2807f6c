"""Validation during training: caption a split and score it (CIDEr-D with the training statistics)."""
from __future__ import annotations

import numpy as np
import torch

from satic.training.config import EvalConfig


@torch.no_grad()
def caption_split(model, data, config: EvalConfig, device: torch.device) -> tuple[list, list[np.ndarray], list[np.ndarray]]:
    """Decode every image of the split (at most max_images) -> (image ids, seqs (T,), references (M, L))."""
    from satic.decoding import DecodeOptions
    from satic.evaluation.splits import decode_split, model_decode

    options = DecodeOptions(beam_size=config.beam_size, max_length=config.max_length)
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


def validate(model, data, config: EvalConfig, device: torch.device) -> dict[str, float]:
    """{'CIDEr-D': mean over images, and with all_metrics the COCO toolkit's metrics too}."""
    ids, seqs, refs = caption_split(model, data, config, device)
    width = max(len(s) for s in seqs)
    candidates = np.stack([np.pad(s, (0, width - len(s))) for s in seqs])  # (B, T)
    metrics = {"CIDEr-D": float(np.mean(data.cider(candidates, refs)))}
    if config.all_metrics:
        from satic.evaluation.metrics import coco_metrics

        vocab = data.vocab
        gts = {i: [vocab.decode(r) for r in ref] for i, ref in zip(ids, refs)}
        res = {i: [vocab.decode(s)] for i, s in zip(ids, seqs)}
        overall, _ = coco_metrics(gts, res)
        metrics.update(overall)
    return metrics
