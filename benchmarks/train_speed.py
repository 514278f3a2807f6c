"""Training speed at the paper's configuration: images per second for XE and for SCST.

Paper-size SAT (6 layers, d_model 512, d_ff 2048, 8 heads, K=2, COCO's 9487 words), batches of 10
images x 5 captions with 10..60 regions x 2048 (random weights and data). One XE iteration is
forward + backward + clipping + Adam step; one SCST iteration is sampling 5 captions per image
with the cached decoder (no grad), their CIDEr-D rewards against 5 references per image (new
self-critical baseline), one parallel log-prob pass with grad, backward and the Adam step: the
same functions `satic train` calls. Prints a table with the reference trainer's measured
numbers on the same configuration for comparison; speed-ups are from wall time, and the process's
CPU time per iteration is printed beside it (on a shared machine the two differ by the wait).

    python benchmarks/train_speed.py [--quick] [--device cpu|cuda] [--precision bf16|fp32] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from satic.decoding import DecodeOptions, decode
from satic.evaluation.cider import CiderD
from satic.evaluation.document_frequency import DocumentFrequency
from satic.model.config import ModelConfig
from satic.model.transformer import SATModel
from satic.training.losses import cross_entropy, self_critical
from satic.training.scst import advantages, caption_rewards
from satic.training.trainer import Objective, mixed_precision

VOCAB = 9487
IMAGES, CAPTIONS, LABEL_LEN = 10, 5, 16
# The reference trainer (YuanEZhou/satic train.py) on the same configuration, seconds per iteration.
REFERENCE = {"cpu": {"xe": 9.2, "scst": 26.6}, "cuda": {"xe": 0.061, "scst": 0.485}}
GOALS = {"xe": 1.5, "scst": 4.0}


def random_batch(rng: np.random.Generator, device: torch.device, feat_dim: int):
    """10 images with 10..60 regions, 5 label rows each, and 5 references per image."""
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


def update(model, optimizer, loss) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.1, foreach=loss.device.type == "cuda")  # as the trainer
    optimizer.step()


def xe_iteration(objective, optimizer, batch, bf16: bool) -> None:
    feats, masks, labels, label_masks, _ = batch
    with mixed_precision(feats.device, bf16):
        logprobs = objective(feats, masks, labels[:, :-1], False).float()  # (50, 17, V+1)
    total, count = cross_entropy(logprobs, labels[:, 1:], label_masks[:, 1:])
    update(objective.model, optimizer, total / count)


def scst_iteration(objective, optimizer, batch, cider, generator, bf16: bool) -> float:
    """One SCST iteration; returns the seconds spent computing rewards."""
    feats, masks, _, _, gts = batch
    with torch.no_grad():
        seq = decode(objective.model, feats, masks, DecodeOptions(sample_method="sample", sample_n=CAPTIONS),
                     generator).seq  # (50, 20)
    start = time.perf_counter()
    rewards = caption_rewards(seq.cpu().numpy(), gts, cider, 1.0)
    reward_seconds = time.perf_counter() - start
    adv = torch.as_tensor(advantages(rewards, CAPTIONS, "new"), dtype=torch.float32, device=seq.device)
    with mixed_precision(feats.device, bf16):
        logprobs = objective(feats, masks, seq, True).float()  # (50, 20)
    total, count = self_critical(logprobs, seq, adv)
    update(objective.model, optimizer, total / count)
    return reward_seconds


def timed(fn, iterations: int, device: torch.device) -> tuple[float, float, list]:
    """Mean wall and process-CPU seconds per call after a warm-up. With one thread on a shared machine,
    CPU seconds leave out the time other processes held the core (wall = CPU on an idle machine)."""
    fn()  # warm-up
    outputs = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        outputs.append(fn())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations, (time.process_time() - cpu_start) / iterations, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed iterations each instead of 5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="on CUDA: bf16 autocast as `satic train` does by default, or plain fp32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SATModel(ModelConfig(vocab_size=VOCAB, group_size=2, num_layers=6, d_model=512, d_ff=2048, num_heads=8,
                                 att_feat_size=2048)).to(device).train()
    objective = Objective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, fused=True)  # as the trainer
    batch = random_batch(rng, device, 2048)
    cider = CiderD(document_frequency(rng)).score_token_ids
    generator = torch.Generator(device=device).manual_seed(0)
    iterations = 2 if args.quick else 5
    bf16 = args.precision == "bf16" and device.type == "cuda"
    xe_s, xe_cpu, _ = timed(lambda: xe_iteration(objective, optimizer, batch, bf16), iterations, device)
    scst_s, scst_cpu, reward_s = timed(lambda: scst_iteration(objective, optimizer, batch, cider, generator, bf16),
                                       iterations, device)
    reference = REFERENCE["cuda" if device.type == "cuda" else "cpu"]
    print(f"device {device} ({torch.get_num_threads()} threads, {'bf16 autocast' if bf16 else 'fp32'}), K=2, 6/512/2048, batch {IMAGES} images x {CAPTIONS}, "
          f"{iterations} timed iterations after a warm-up")
    print(f"{'mode':<5} {'s/iter':>8} {'cpu s/iter':>11} {'images/s':>9} {'reference images/s':>19} {'speed-up':>9} "
          f"{'goal':>6}")
    for mode, seconds, cpu in (("xe", xe_s, xe_cpu), ("scst", scst_s, scst_cpu)):
        ref = IMAGES / reference[mode]
        ours = IMAGES / seconds
        print(f"{mode:<5} {seconds:>8.3f} {cpu:>11.3f} {ours:>9.2f} {ref:>19.2f} {ours / ref:>8.2f}x {GOALS[mode]:>5.1f}x")
    print(f"SCST time in the CIDEr-D reward: {np.mean(reward_s) * 1000:.1f} ms per iteration "
          f"({np.mean(reward_s) / scst_s:.1%})")


if __name__ == "__main__":
    main()
