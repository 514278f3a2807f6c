"""Reading large photos for feature extraction: time and peak memory of three ways, with the same features.

A batch of --images synthetic photos (--width x --height JPEGs, smooth colour fields, made once in a
temporary folder) goes through EfficientNet-Lite0 at 224 x 224 pixels, each way in a fresh process (so
that its peak resident memory is its own), the ways interleaved, --repeats times:
  * decoded batch: every photo of the batch decoded, then each shrunk to the backbone's size as the batch
    is stacked (satic before d1c39cc);
  * shrunk as read: each photo shrunk as soon as it is decoded (FeatureExtractor.read), PIL giving each
    photo's memory back to the system before the next is decoded;
  * shrunk as read, memory reused (satic's extract_paths): the same, with PIL keeping up to
    IMAGE_MEMORY_BLOCKS blocks of decoded-image memory for the next photo.
Prints the median seconds, the ratio to the decoded batch, the peak resident memory, and whether the
features equal the decoded batch's.

    python benchmarks/image_reading.py                 # 16 photos of 24 megapixels
    python benchmarks/image_reading.py --images 4      # quicker
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WAYS = ("decoded batch", "shrunk as read", "shrunk as read, memory reused")


def make_photos(folder: Path, count: int, width: int, height: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
        path = folder / f"{i}.jpg"
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def run_way(way: str, paths: list[Path]) -> dict:
    """One way, in this (fresh) process: seconds, peak resident MB, a digest of the features."""
    import torch

    from satic.data import extract
    from satic.data.extract import ExtractorSettings, FeatureExtractor, load_image

    torch.set_num_threads(1)
    extractor = FeatureExtractor(ExtractorSettings(size=224))
    start = time.perf_counter()
    if way == "decoded batch":
        att, _ = extractor([load_image(path) for path in paths])
    else:
        if way == "shrunk as read":
            extract.reused_image_memory = lambda: contextlib.nullcontext()  # PIL's default: nothing kept
        att = np.stack([row for _, row, _ in extractor.extract_paths(paths, batch_size=len(paths))])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"seconds": seconds, "peak_mb": peak, "digest": hashlib.sha256(att.tobytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="photos in the batch (default 16)")
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # WAY FOLDER: run one way and print its JSON
    args, rest = parser.parse_known_args()
    if args.child:
        print(json.dumps(run_way(args.child, sorted(Path(rest[0]).glob("*.jpg"), key=lambda p: int(p.stem)))))
        return
    if rest:  # only a child takes a folder after its options
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from satic.evaluation.report import text_table

    with tempfile.TemporaryDirectory(prefix="satic-bench-") as folder:
        make_photos(Path(folder), args.images, args.width, args.height)
        runs: dict[str, list[dict]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                done = subprocess.run([sys.executable, __file__, "--child", way, folder], capture_output=True,
                                      text=True, check=True)
                runs[way].append(json.loads(done.stdout.splitlines()[-1]))
    base = statistics.median(r["seconds"] for r in runs[WAYS[0]])
    rows = []
    for way, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        same = all(r["digest"] == runs[WAYS[0]][0]["digest"] for r in results)
        rows.append([way, f"{seconds:.2f}", f"{base / seconds:.2f}x", f"{max(r['peak_mb'] for r in results):.0f}",
                     "yes" if same else "NO"])
    print(f"{args.images} photos of {args.width} x {args.height} pixels (JPEG) -> EfficientNet-Lite0 at 224 x 224, "
          f"one batch, 1 thread; median of {args.repeats}")
    print(text_table(["way", "seconds", "speed vs decoded batch", "peak resident MB", "same features"], rows))


if __name__ == "__main__":
    main()
