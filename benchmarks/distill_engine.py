"""The decoding of `satic distill`: the teacher's beam search over the training split through a Decoder (the native
engine on the CPU, as `satic distill` and `satic eval` decode) against the bare model's Python loop, interleaved in
one run, with the captions compared. The teacher is a checkpoint (`satic demo` writes RUN/teacher_scst/best) on its
data folder, or, without --teacher, a model of random weights of the demo's size on a built-in dataset made here.

    python benchmarks/distill_engine.py --teacher runs/demo/teacher_scst/best --data runs/demo/data
    python benchmarks/distill_engine.py --images 600
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from satic.config import configs_dir, load_config
from satic.data.dataset import CaptionData
from satic.data.synth import FEATURES_NAME, prepare_builtin
from satic.decoding import Decoder
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_calls
from satic.model import SATModel
from satic.model.checkpoint import load_checkpoint
from satic.training.config import TrainConfig, check_model_section
from satic.training.distill import teacher_captions


def random_teacher(folder: Path, images: int) -> tuple[SATModel, CaptionData]:
    prepare_builtin(folder, images=images, feature_dim=128)  # the demo's features
    data = CaptionData.from_dir(folder, folder / FEATURES_NAME)
    config = load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml").model
    torch.manual_seed(0)
    model = SATModel(check_model_section(config, vocab_size=len(data.vocab), att_feat_size=data.feature_dim))
    return model, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="a K=1 checkpoint folder (default: random weights of the demo's size)")
    parser.add_argument("--data", help="its prepared data folder, with feats_att")
    parser.add_argument("--images", type=int, default=600, help="images of the built-in dataset (without --teacher)")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the split; each keeps its best")
    parser.add_argument("--threads", type=int, default=1, help="torch's threads")
    args = parser.parse_args(argv)
    if (args.teacher is None) != (args.data is None):
        parser.error("--teacher and --data go together")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        if args.teacher is None:
            model, data = random_teacher(Path(temporary), args.images)
        else:
            checkpoint = load_checkpoint(args.teacher)
            model = checkpoint.model
            data = CaptionData.from_dir(args.data, Path(args.data) / FEATURES_NAME,
                                        norm_att_feat=checkpoint.features.norm_att_feat,
                                        use_box=checkpoint.features.use_box)
        model.eval()
        engine = Decoder.prepare(model, "fp32", compile=True)
        settings = dict(beam_size=args.beam_size, batch_size=args.batch_size, max_length=args.max_length,
                        n_best=args.beam_size, device=torch.device("cpu"), progress=False)
        timings = time_calls({"python loop": lambda: teacher_captions(model, data, **settings),
                              "decoder": lambda: teacher_captions(engine, data, **settings)}, passes=args.passes)
    loop, native = timings["python loop"], timings["decoder"]
    same = sum(len(loop.output[i]) == len(native.output[i]) and all(map(np.array_equal, loop.output[i],
                                                                        native.output[i])) for i in loop.output)
    images = len(loop.output)
    print(text_table(["decoding", "s per split", "ms per image"],
                     [[name, f"{t.value:.2f}", f"{1000 * t.value / images:.1f}"] for name, t in timings.items()]))
    print(f"{images} training images, beam {args.beam_size}, batch {args.batch_size}, {args.threads} thread(s), best "
          f"of {args.passes}: the decoder is {loop.value / native.value:.2f}x the Python loop; {same} of {images} "
          "images have the same captions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
