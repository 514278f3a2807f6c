"""One ordered pass over a split of a prepared dataset, decoded batch by batch.

Validation during training, `satic eval` / `satic caption`-style evaluation and sequence-level
distillation all caption a split; they differ only in what decodes (a bare model or a `Captioner`)
and in what they keep of each batch, so they share this generator.
"""
from __future__ import annotations

from typing import Callable, Iterator

from torch import Tensor

from satic.decoding import DecodeOptions, DecodeResult
from satic.progress import progress_bar

DecodeFn = Callable[[Tensor, "Tensor | None", DecodeOptions], DecodeResult]


def decode_split(decode: DecodeFn, data, split: str, options: DecodeOptions, batch_size: int = 50,
                 max_images: int | None = None, progress: bool = False, seq_per_img: int = 1,
                 first_image: int = 0) -> Iterator[tuple]:
    """Yield (batch, result) for the split's images in file order (at most max_images; None or
    a negative number: all), from its first_image (a multiple of batch_size).

    decode(att_feats (B, N, D), att_masks (B, N) bool, options) -> DecodeResult, e.g. Captioner.decode;
    it moves the batch to its device. The result's rows are image-major, options.n_best per image (or
    sample_n when sampling). Each batch holds seq_per_img label captions per image (batch.labels). The
    progress bar counts images.
    """
    from satic.data.dataset import iterate_split

    total = len(data.split_indices(split))
    count = total if max_images is None or max_images < 0 else min(max_images, total)
    with progress_bar(progress, total=count, initial=first_image, desc=f"captioning {split}", unit="img") as bar:
        for batch in iterate_split(data, split, batch_size, seq_per_img, max_images, first_image=first_image):
            yield batch, decode(batch.att_feats, batch.att_masks, options)
            if bar is not None:
                bar.update(len(batch.image_ids))


def split_image_ids(data, split: str, max_images: int | None = None) -> list:
    """Ids of the images decode_split decodes: the split's first max_images (None or negative: all), in file
    order."""
    indices = data.split_indices(split)
    if max_images is not None and max_images >= 0:
        indices = indices[:max_images]
    return [data.images[i]["id"] for i in indices]


def model_decode(model, device) -> DecodeFn:
    """A DecodeFn for a SATModel on `device`, bare (no inference preparation) or a Decoder of it, through
    satic.decoding.decode."""
    from satic.decoding import decode

    def run(att_feats: Tensor, att_masks: Tensor | None, options: DecodeOptions) -> DecodeResult:
        masks = None if att_masks is None else att_masks.to(device)
        return decode(model, att_feats.to(device), masks, options)

    return run
