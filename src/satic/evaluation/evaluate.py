"""Caption a split of a prepared dataset, score it with the coco-caption metrics, time the decoding.

Latency is what the reference's eval_split prints, wall time of decoding plus turning token ids
into text divided by the number of images at the chosen batch size, measured apart from the
captioning pass with `satic.evaluation.timing`: on the split's first images, after an untimed pass
(which traces the step for each new shape), best of a few timed passes. `Latency.describe()` says so.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from satic.captioner import Captioner, format_captions, pad_features
from satic.data.stores import FeatureStore, open_store
from satic.decoding import DecodeOptions
from satic.errors import SaticError
from satic.evaluation.timing import Timing, time_calls, torch_threads
from satic.io import (left_unfinished, refuse_existing_in, staged_outputs, unfinished_set,
                      user_outputs, write_json)


@dataclass(frozen=True)
class Latency:
    """Milliseconds per image of decoding + detokenising at one batch size, and how they were measured."""

    ms_per_image: float
    timing: Timing  # seconds of each timed pass over all the images
    images: int
    batch_size: int
    beam_size: int
    precision: str
    device: str

    def describe(self) -> str:
        return (f"{self.ms_per_image:.2f} ms per image (batch size {self.batch_size}, beam size {self.beam_size}, "
                f"{self.precision}, {self.device}; {self.timing.describe()} over {self.images} images)")

    def as_dict(self) -> dict:
        return {"ms_per_image": self.ms_per_image, "statistic": self.timing.statistic,
                "passes_ms_per_image": [s / self.images * 1000.0 for s in self.timing.seconds],
                "warm_up_passes": self.timing.warm_up, "threads": self.timing.threads, "images": self.images,
                "batch_size": self.batch_size, "beam_size": self.beam_size, "precision": self.precision,
                "device": self.device}


@dataclass
class EvalResult:
    metrics: dict[str, float]  # the toolkit's names: Bleu_1..4, METEOR, ROUGE_L, CIDEr (, SPICE)
    ms_per_image: float  # latency.ms_per_image
    predictions: list[dict]  # COCO result list [{"image_id", "caption"}]
    per_image: dict = field(default_factory=dict)  # image id -> {metric: value}
    num_images: int = 0
    settings: dict = field(default_factory=dict)  # split, beam size, batch size, precision, checkpoint
    out_dir: Path | None = None
    latency: Latency | None = None


def as_captioner(checkpoint: Captioner | str | os.PathLike, precision: str = "fp32",
                 device: str | torch.device = "cpu") -> Captioner:
    return checkpoint if isinstance(checkpoint, Captioner) else Captioner.load(checkpoint, precision, device)


def default_features(data_dir: Path, captioner: Captioner) -> Path:
    """The built-in dataset's store for the checkpoint's feature kind; other datasets name theirs."""
    from satic.data.synth import FEATURES_NAME, GRID_FEATURES_NAME

    path = data_dir / {"bottom-up": FEATURES_NAME, "grid": GRID_FEATURES_NAME}[captioner.features.kind]
    if not Path(data_dir).is_dir():
        raise SaticError(f"data folder not found: {data_dir}; give the folder `satic prepro` (or `satic synth`) "
                         "wrote with --data")
    if not path.exists():
        raise SaticError(f"no {captioner.features.kind} features at {path}; give the feature store with --features")
    return path


def caption_batches(captioner: Captioner, batches, options: DecodeOptions) -> list[str]:
    """Captions of padded (feats, masks) batches: the work latency counts (decoding + detokenising)."""
    captions: list[str] = []
    for feats, masks in batches:
        captions += format_captions(captioner.decode(feats, masks, options), captioner.vocab, 1, False, False,
                                    options.remove_bad_endings)
    return captions


def latency_batches(captioner: Captioner, data, split: str, batch_size: int, max_images: int | None) -> list:
    """The split's first images as padded (feats, masks) batches on the captioner's device, ready to time."""
    from satic.data.dataset import iterate_split

    out = []
    for batch in iterate_split(data, split, batch_size, 1, max_images):
        feats, masks = pad_features(batch.att_feats, batch.att_masks)
        out.append((feats.to(captioner.device), None if masks is None else masks.to(captioner.device)))
    return out


def measure_latency(runs: dict[str, tuple[Captioner, list, DecodeOptions]], passes: int = 3,
                    threads: int | None = None) -> dict[str, Latency]:
    """{name: Latency} for runs {name: (captioner, batches from latency_batches, options)}: one untimed
    pass of each, then `passes` timed passes interleaved over the runs; each keeps its best pass."""
    calls = {name: (lambda c=c, b=b, o=o: caption_batches(c, b, o)) for name, (c, b, o) in runs.items()}
    devices = {c.device for c, _, _ in runs.values()}
    with torch_threads(threads):
        timings = time_calls(calls, passes, warm_up=1, statistic="best",
                             device=next(iter(devices)) if len(devices) == 1 else None)
    out = {}
    for name, (captioner, batches, options) in runs.items():
        images = sum(feats.size(0) for feats, _ in batches)
        timing = timings[name]
        out[name] = Latency(timing.value / images * 1000.0, timing, images, batches[0][0].size(0),
                            options.beam_size, captioner.precision, str(captioner.device))
    return out


def split_references(data, ids: list, references: str | os.PathLike | None, data_dir: Path) -> dict:
    """Raw human captions (--references, else the data folder's references.json or dataset.json), else the
    label file's captions (lower-cased, cut at 16 words, rare words as UNK) with a warning."""
    from satic.evaluation.results import DATA_REFERENCE_FILES, find_references

    found = find_references(data_dir, ids, references, "give the reference file of this dataset with --references")
    if found is not None:
        return found[1]
    print(f"note: no {' or '.join(DATA_REFERENCE_FILES)} in {data_dir} has these images' captions; scoring against "
          "the label file's captions (truncated, with UNK); give --references (e.g. dataset_coco.json) for the "
          "standard numbers")
    index = {img["id"]: n for n, img in enumerate(data.images)}
    return {i: [data.vocab.decode(row) for row in data.labels.captions(index[i])] for i in ids}


def open_data(captioner: Captioner, data_dir: str | os.PathLike, features: str | os.PathLike | None = None):
    """The prepared dataset with its regions prepared as the checkpoint was trained (norm/box)."""
    from satic.data.dataset import CaptionData

    data_dir = Path(data_dir)
    spec = captioner.features
    data = CaptionData.from_dir(data_dir, features or default_features(data_dir, captioner),
                                norm_att_feat=spec.norm_att_feat, use_box=spec.use_box)
    captioner.check_dim(data.feature_dim, f"the features in {data.store.path}")
    captioner.check_store(data.store.path)
    return data


def caption_split(captioner: Captioner, data, split: str, options, batch_size: int = 50,
                  max_images: int | None = None, progress: bool = False) -> tuple[list, list[str]]:
    """Caption a split in file order -> (image ids, captions)."""
    from satic.evaluation.splits import decode_split

    ids: list = []
    captions: list[str] = []
    for batch, result in decode_split(captioner.decode, data, split, options, batch_size, max_images, progress):
        ids += list(batch.image_ids)
        captions += format_captions(result, captioner.vocab, 1, False, False, options.remove_bad_endings)
    return ids, captions


def evaluate_split(
    checkpoint: Captioner | str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    beam_size: int = 1,
    batch_size: int = 50,
    max_images: int | None = None,
    features: str | os.PathLike | None = None,
    references: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    spice: bool = False,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    progress: bool = False,
    latency_images: int = 100,
    latency_passes: int = 3,
    overwrite: bool = False,
    image_root: str | os.PathLike | None = None,
    **decode_options: Any,
) -> EvalResult:
    """Caption `split` of a prepared dataset (`satic prepro` / `satic synth` output), score it, and time
    the decoding of its first `latency_images` images (best of `latency_passes` after an untimed pass);
    with out_dir, write predictions.json, scores.json (per image), metrics.json and, when the images
    are there (each image's file_path under `image_root`, by default data_dir), predictions.html. Files of those
    names already in out_dir are replaced only with `overwrite` (a predictions.html this run does not write is then
    removed, not left stale)."""
    from satic.evaluation.metrics import coco_metrics
    from satic.evaluation.splits import split_image_ids

    unfinished = out_dir is not None and left_unfinished(Path(out_dir), "eval")
    if out_dir is not None:
        refuse_existing_in(out_dir, EVAL_OUTPUTS, overwrite or unfinished, "out_dir")
    captioner = as_captioner(checkpoint, precision, device)
    data = open_data(captioner, data_dir, features)
    options = captioner.options(beam_size, **decode_options)
    # the references first: a missing or unfitting file is named before the split is captioned
    gts = split_references(data, split_image_ids(data, split, max_images), references, Path(data_dir))
    ids, captions = caption_split(captioner, data, split, options, batch_size, max_images, progress)
    timed = min(latency_images, len(ids))
    latency = measure_latency({"eval": (captioner, latency_batches(captioner, data, split, batch_size, timed),
                                        options)}, latency_passes)["eval"]
    metrics, per_image = coco_metrics(gts, {i: [c] for i, c in zip(ids, captions)}, spice=spice)
    result = EvalResult(
        metrics=metrics,
        ms_per_image=latency.ms_per_image,
        predictions=[{"image_id": i, "caption": c} for i, c in zip(ids, captions)],
        per_image=per_image,
        num_images=len(ids),
        settings={"split": split, "beam_size": beam_size, "batch_size": batch_size, "precision": captioner.precision,
                  "checkpoint": captioner.name, "group_size": captioner.config.group_size,
                  "device": str(captioner.device), "decoding": asdict(options),
                  **({"ensemble_weights": captioner.weights} if captioner.weights else {})},
        latency=latency,
    )
    if out_dir is not None:
        images = image_paths(data, ids, Path(image_root or data_dir))
        if image_root is not None and not images:
            example = next((img["file_path"] for img in data.images if img.get("file_path")), None)
            print(f"note: no image of the split is under --image-root {image_root}"
                  + (f" (e.g. {Path(image_root) / example})" if example else " (cocotalk.json gives no file paths)")
                  + "; predictions.html is not written", file=sys.stderr)
        with user_outputs(True) if unfinished else contextlib.nullcontext():
            result.out_dir = write_eval_outputs(Path(out_dir), result, gts, images)
    return result


def image_paths(data, ids: list, images_root: Path) -> dict:
    """image id -> image file, for the images that exist (the built-in dataset has them all)."""
    by_id = {img["id"]: img for img in data.images}
    paths = {i: images_root / by_id[i]["file_path"] for i in ids if by_id[i].get("file_path")}
    return {i: p for i, p in paths.items() if p.is_file()}


EVAL_OUTPUTS = ("predictions.json", "scores.json", "metrics.json", "predictions.html")


def write_eval_outputs(out_dir: Path, result: EvalResult, gts: dict, images: dict) -> Path:
    from satic.evaluation.html import PageItem, write_html_page
    from satic.evaluation.results import write_results

    # one set: an evaluation stopped while writing leaves out_dir as it was, never one evaluation's predictions
    # with another's scores
    with unfinished_set(out_dir, "eval"), staged_outputs() as stage:
        write_results(stage(out_dir / "predictions.json"), [(p["image_id"], p["caption"]) for p in result.predictions])
        write_json(stage(out_dir / "scores.json"), {str(p["image_id"]): {"caption": p["caption"],
                                                                         **result.per_image[p["image_id"]]}
                                                    for p in result.predictions})
        write_json(stage(out_dir / "metrics.json"), {"metrics": result.metrics, "ms_per_image": result.ms_per_image,
                                                     "latency": result.latency.as_dict() if result.latency else None,
                                                     "num_images": result.num_images, **result.settings})
        if images:
            items = [PageItem(p["image_id"], {"prediction": p["caption"]}, images.get(p["image_id"]),
                              gts[p["image_id"]],
                              {k: v for k, v in result.per_image[p["image_id"]].items() if k in ("CIDEr", "Bleu_4")})
                     for p in result.predictions]
            write_html_page(stage(out_dir / "predictions.html"), items, f"satic {result.settings['split']} predictions")
    if not images:  # an earlier evaluation's page would no longer match predictions.json
        (out_dir / "predictions.html").unlink(missing_ok=True)
    return out_dir


SERVER_BEAM_SIZE = 3  # eval_cocotest.py's default, with which the reference's server results were made


def server_results(
    checkpoint: Captioner | str | os.PathLike,
    features: FeatureStore | str | os.PathLike,
    server_split: str,
    alg: str,
    image_list: str | os.PathLike,
    out_dir: str | os.PathLike,
    beam_size: int = SERVER_BEAM_SIZE,
    batch_size: int = 50,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    progress: bool = False,
    overwrite: bool = False,
    image_ids: Sequence[int] | None = None,
    **decode_options: Any,
) -> Path:
    """Caption the listed images of a store with no references (test2014/val2014) and write the COCO
    server file captions_<split>_<alg>_results.json, checked to hold every listed image once; a file of
    that name in out_dir is replaced only with `overwrite`. `features` is the store's path, or the store open
    (left open); `image_ids` the list's ids, where the caller has read them (read_image_ids) and checked them
    against that store (check_listed_in_store) already (None: read and checked here)."""
    from satic.evaluation.results import read_image_ids, server_results_name, write_server_results

    refuse_existing_in(out_dir, [server_results_name(server_split, alg)], overwrite, "out_dir")  # before captioning
    wanted = read_image_ids(image_list, server_split) if image_ids is None else list(image_ids)
    with contextlib.ExitStack() as stack:
        store = features if isinstance(features, FeatureStore) else stack.enter_context(open_store(features))
        if image_ids is None:
            check_listed_in_store(wanted, image_list, store)
        captioner = as_captioner(checkpoint, precision, device)  # once the list and the store are known good
        results = captioner.caption_store(store, [str(i) for i in wanted], batch_size, beam_size,
                                          progress=progress, **decode_options)
    return write_server_results(out_dir, server_split, alg, [(r["image_id"], r["caption"]) for r in results], wanted)


def check_listed_in_store(image_ids: Sequence[int], image_list: str | os.PathLike, store: FeatureStore) -> None:
    """Refuse a server split's list (`image_ids`, read from `image_list`) with an image the open store lacks: the
    server needs a caption for every one (checked before a model loads: a paper-size checkpoint takes seconds)."""
    stored = set(store.ids())
    missing = [i for i in image_ids if str(i) not in stored]
    if missing:
        raise SaticError(f"feature store {store.path} lacks {len(missing)} of the {len(image_ids)} listed images "
                         f"(e.g. {missing[:3]}); the server needs every image of {image_list}"
                         f"{store.missing_note([str(i) for i in missing])}")
