"""Training speed at the paper's configuration: images per second for XE and for SCST.

Paper-size SAT (6 layers, d_model 512, d_ff 2048, 8 heads, K=2, COCO's 9487 words), batches of 10
images x 5 captions with 10..60 regions x 2048 (random weights and data). One iteration is what
`satic train` runs for one optimizer step, through the trainer's own functions (`xe_loss`,
`scst_loss`, `clip_and_step`) with the default config: XE = forward, backward, clipping, Adam;
SCST = sampling 5 captions per image with autograd on (the decoder re-run over the prefix at every
step, as the reference's), their CIDEr-D rewards (new self-critical baseline), backward through the
sampling pass, clipping, Adam. `scst-kept` is the opt-in `scst.prefix_dropout=kept` (the prefix's
keys/values cached), `scst-rescore` the opt-in `scst.logprobs=rescore` (sampling without grad, then a
parallel scoring pass).

With `--reference-src PATH` (a checkout of YuanEZhou/satic with its `cider` and `coco-caption`
submodules, and `six` installed) the reference trainer runs in the same process on the same batch
and threads, interleaved with satic's: its LossWrapper (XE: student pass and the teacher pass it
always runs, here a model of the student's size; SCST: sampling, the greedy decode that
get_self_critical_reward always runs, CiderD, RewardCriterion), backward, clip_gradient, Adam.
The speed-ups are ratios of those timings. Without it, the reference's stored timings are printed
with their provenance and no ratio.

With `--before DIR` (a git worktree of another commit) the same iterations of that code and of this one
run instead, in alternating processes (`--rounds`, each timing `--passes` after one untimed), on the same
batch and threads, and the table gives both and their ratio.

    python benchmarks/train_speed.py [--reference-src PATH | --before DIR [--rounds N]] [--passes N]
                                     [--device cpu|cuda] [--precision bf16|fp32] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from satic.config import configs_dir, from_dict, load_config
from satic.evaluation.cider import CiderD
from satic.evaluation.document_frequency import DocumentFrequency
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_calls
from satic.model.transformer import SATModel
from satic.training.config import TrainConfig, check_model_section
from satic.training.trainer import Objective, clip_and_step, scst_loss, xe_loss

VOCAB = 9487
IMAGES, CAPTIONS, LABEL_LEN = 10, 5, 16
# Stored timings of the reference trainer on this configuration, seconds per iteration, for runs
# without --reference-src: (XE, SCST, where and when they were measured).
STORED_REFERENCE = {
    "cpu": (6.77, 19.5, "2-core x86-64 VM, 2 threads, torch 2.13.0 CPU, 2026-11"),
    "cuda": (0.061, 0.485, "one H200, the reference code as released, 2026-11"),
}
# `satic train`'s settings at the paper config, the COCO recipe's (configs/coco) batch shape
PAPER = {"progress": False, "max_iters": 1, "data": {"batch_size": IMAGES, "seq_per_img": CAPTIONS},
         "optim": {"grad_clip": 0.1, "grad_clip_mode": "value"},
         "scst": {"after_epoch": 0, "sample_n": CAPTIONS, "baseline": "new", "max_length": 20}}


def random_batch(rng: np.random.Generator, device: torch.device, feat_dim: int):
    """10 images with 10..60 regions, 5 label rows each, and 5 references per image:
    (feats (B, N, D), masks (B, N), labels (B*5, L+2), label masks (B*5, L+2), references)."""
    regions = rng.integers(10, 61, size=IMAGES)
    feats = torch.zeros(IMAGES, regions.max(), feat_dim)
    masks = torch.zeros(IMAGES, regions.max(), dtype=torch.bool)
    for i, n in enumerate(regions):
        feats[i, :n] = torch.from_numpy(rng.standard_normal((n, feat_dim), dtype=np.float32))
        masks[i, :n] = True
    lengths = rng.integers(8, LABEL_LEN + 1, size=IMAGES * CAPTIONS)
    captions = np.zeros((IMAGES * CAPTIONS, LABEL_LEN), dtype=np.int64)
    for r, n in enumerate(lengths):
        captions[r, :n] = rng.integers(1, VOCAB + 1, size=n)
    labels = np.zeros((len(captions), LABEL_LEN + 2), dtype=np.int64)
    labels[:, 1:-1] = captions
    label_masks = (np.arange(LABEL_LEN + 2)[None] < (lengths + 2)[:, None]).astype(np.float32)
    gts = [captions[i * CAPTIONS:(i + 1) * CAPTIONS] for i in range(IMAGES)]
    return (feats.to(device), masks.to(device), torch.from_numpy(labels).to(device),
            torch.from_numpy(label_masks).to(device), gts)


def document_frequency(rng: np.random.Generator) -> DocumentFrequency:
    """Training-corpus statistics over random captions (the reward needs some; their values do not matter)."""
    refs = [[[str(w) for w in rng.integers(1, VOCAB + 1, size=rng.integers(8, 17))] + ["0"] for _ in range(5)]
            for _ in range(2000)]
    return DocumentFrequency.from_references(refs)


@dataclass
class PaperBatch:
    """The fields of satic.data.dataset.Batch that the trainer's loss functions read."""

    att_feats: torch.Tensor
    att_masks: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    gts: list


def satic_iterations(device: torch.device, batch: PaperBatch, cider, bf16: bool) -> dict:
    """One `satic train` iteration each: XE, SCST (default), and SCST with scst.prefix_dropout=kept and with
    scst.logprobs=rescore."""
    torch.manual_seed(0)
    sizes = load_config(TrainConfig, configs_dir() / "coco" / "sat_k2_xe.yaml").model  # the paper's K=2 model
    model = SATModel(check_model_section(sizes, VOCAB, batch.att_feats.size(-1))).to(device).train()
    net = Objective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, fused=True)  # as the trainer
    generator = torch.Generator(device=device).manual_seed(0)
    variants = {"scst": {}, "scst-kept": {"prefix_dropout": "kept"}, "scst-rescore": {"logprobs": "rescore"}}
    configs = {name: from_dict(TrainConfig, {**PAPER, "bf16": bf16, "scst": {**PAPER["scst"], **variant}})
               for name, variant in variants.items()}
    words = batch.masks[:, 1:].sum()

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(model, optimizer, configs["scst"].optim)

    calls = {"xe": lambda: step(xe_loss(net, batch, words, configs["scst"]))}
    for name, config in configs.items():
        calls[name] = lambda config=config: step(scst_loss(net, model, batch, config, cider, None, generator)[0])
    return calls


def reference_iterations(src: Path, device: torch.device, batch: PaperBatch) -> dict:
    """One iteration each of the reference trainer (its train.py loop body) on the same batch: XE and SCST."""
    # Its modules import each other (and its cider and coco-caption submodules) as top-level packages, all at
    # import time: its folders lead sys.path while they are imported, and sys.path is restored after.
    path, sys.path = sys.path, [str(src), str(src / "cider"), str(src / "coco-caption"), *sys.path]
    argv, sys.argv = sys.argv, ["train.py", "--caption_model", "sat", "--K", "2", "--num_layers", "6",
                                "--input_encoding_size", "512", "--rnn_size", "2048", "--seq_per_img", str(CAPTIONS),
                                "--batch_size", str(IMAGES), "--noamopt", "--noamopt_warmup", "20000",
                                "--learning_rate", "5e-4", "--teacher_caption_model", "sat"]
    try:
        import misc.rewards as rewards
        import misc.utils as utils
        import models
        import opts
        from misc.loss_wrapper import LossWrapper
        from pyciderevalcap.ciderD.ciderD import CiderD as ReferenceCiderD
        from pycocoevalcap.bleu.bleu import Bleu

        opt = opts.parse_opt()
    except ImportError as err:
        raise SystemExit(f"--reference-src {src}: cannot import the reference code ({err}); give a checkout of "
                         "YuanEZhou/satic with its cider and coco-caption submodules, and pip install six")
    finally:
        sys.path, sys.argv = path, argv
    opt.vocab_size, opt.seq_length, opt.use_fc, opt.use_att = VOCAB, LABEL_LEN, True, True
    torch.manual_seed(0)
    model = models.setup(opt).to(device)
    teacher = models.setup(opt).to(device).eval()
    wrapper = LossWrapper(model, teacher, opt).train()
    optimizer = utils.get_std_opt(model, factor=opt.noamopt_factor, warmup=opt.noamopt_warmup)
    # init_scorer without a document-frequency file: 'corpus' mode counts them over each call's references
    rewards.CiderD_scorer, rewards.Bleu_scorer = ReferenceCiderD(df="corpus"), Bleu(4)
    rewards.CiderD_scorer.cider_scorer.document_frequency = {}  # read (then replaced) by copy_empty
    rows = batch.labels.size(0)
    repeat = rows // batch.att_feats.size(0)  # the reference's loader repeats each image's features per caption
    att_feats = batch.att_feats.repeat_interleave(repeat, 0)
    att_masks = batch.att_masks.repeat_interleave(repeat, 0).float()
    fc_feats = att_feats.mean(1)
    gts = batch.gts

    def iteration(sc_flag: bool) -> None:
        optimizer.zero_grad()
        with contextlib.redirect_stdout(io.StringIO()):  # the reward function prints every batch's scores
            out = wrapper(fc_feats, att_feats, batch.labels, batch.masks, att_masks, gts, torch.arange(len(gts)),
                          sc_flag)
        out["loss"].mean().backward()
        utils.clip_gradient(optimizer, opt.grad_clip)
        optimizer.step()

    return {"reference xe": lambda: iteration(False), "reference scst": lambda: iteration(True)}


def compare_versions(before: Path, args: argparse.Namespace) -> None:
    """Alternating processes of this file's --worker on before/src and on this code: a table of each iteration's
    median seconds over every round's passes, and before / after."""
    versions = {"before": before.resolve() / "src", "after": Path(__file__).resolve().parents[1] / "src"}
    seconds: dict[str, dict[str, list[float]]] = {name: {} for name in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, src in versions.items():
                out = Path(tmp) / f"{name}{r}.json"
                subprocess.run([sys.executable, __file__, "--worker", str(out), "--passes", str(args.passes),
                                "--threads", str(args.threads), "--device", args.device, "--precision",
                                args.precision], env={**os.environ, "PYTHONPATH": str(src)}, check=True)
                for call, values in json.loads(out.read_text()).items():
                    seconds[name].setdefault(call, []).extend(values)
    print(f"device {args.device}, {args.precision}, K=2, 6/512/2048, batch {IMAGES} images x {CAPTIONS}; median of "
          f"{args.rounds} alternating rounds x {args.passes} passes after 1 untimed, {args.threads or 'default'} "
          f"CPU threads; before: {before}")
    rows = []
    for call in seconds["after"]:
        old, new = (float(np.median(seconds[name][call])) for name in versions)
        rows.append([call, f"{old:.3f}", f"{new:.3f}", f"{old / new:.2f}x"])
    print(text_table(["iteration", "before s/iter", "after s/iter", "before / after"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-src", type=Path, help="a checkout of the reference code, timed in the same run")
    parser.add_argument("--before", type=Path, help="a git worktree of another commit, timed against this code")
    parser.add_argument("--rounds", type=int, default=3, help="with --before: alternating processes of each")
    parser.add_argument("--passes", type=int, default=3, help="timed iterations of each (after one untimed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="fp32",
                        help="on CUDA: plain float32 (`satic train`'s default) or bf16 autocast (bf16=true)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # --before's process: seconds to this file
    args = parser.parse_args()
    if args.before is not None:
        if args.reference_src:
            parser.error("give --reference-src or --before, not both")
        if not (args.before / "src" / "satic").is_dir():  # else the worker would import this code
            parser.error(f"--before {args.before}: no src/satic there (give a git worktree of another commit)")
        return compare_versions(args.before, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    feats, masks, labels, label_masks, gts = random_batch(rng, device, 2048)
    batch = PaperBatch(feats, masks, labels, label_masks, gts)
    cider = CiderD(document_frequency(rng)).score_token_ids
    bf16 = args.precision == "bf16" and device.type == "cuda"
    calls = satic_iterations(device, batch, cider, bf16)
    if args.reference_src:
        calls.update(reference_iterations(args.reference_src, device, batch))
    timings = time_calls(calls, passes=args.passes, warm_up=1, statistic="median", device=device)
    if args.worker is not None:
        import satic  # the version compare_versions put first on the path, not this checkout's

        if not Path(satic.__file__).resolve().is_relative_to(Path(os.environ["PYTHONPATH"]).resolve()):
            raise SystemExit(f"--worker: imported satic from {satic.__file__}, not from {os.environ['PYTHONPATH']}")
        args.worker.write_text(json.dumps({name: list(t.seconds) for name, t in timings.items()}))
        return
    some = next(iter(timings.values()))
    print(f"device {device}, {'bf16 autocast' if bf16 else 'fp32'}, K=2, 6/512/2048, batch {IMAGES} images x "
          f"{CAPTIONS}; {some.describe()}, interleaved")
    stored = STORED_REFERENCE["cuda" if device.type == "cuda" else "cpu"]
    rows = []
    for name, timing in timings.items():
        ratio = ""
        mode = "xe" if name.endswith("xe") else "scst"
        if args.reference_src and not name.startswith("reference"):
            ratio = f"{timings['reference ' + mode].value / timing.value:.2f}x"
        rows.append([name, f"{timing.value:.3f}", f"{timing.cpu_value:.3f}", f"{IMAGES / timing.value:.2f}", ratio])
    print(text_table(["iteration", "s/iter", "cpu s/iter", "images/s", "vs reference"], rows))
    if not args.reference_src:
        print(f"reference trainer, stored (not timed here, so no ratio): XE {stored[0]} s/iter, SCST {stored[1]} "
              f"s/iter on {stored[2]}; time it here with --reference-src PATH")


if __name__ == "__main__":
    main()
