"""torchrun with 2 CPU processes (gloo) trains like 1 process on the same global batch."""
import json
import os
import subprocess
import sys

import torch
import yaml

from satic.training.trainer import train
from training_helpers import tiny_config, weights

# The two runs sum the same terms in another order (per-rank partial sums, then an all-reduce), so
# gradients agree to float32 rounding, not bit for bit. Adam with eps 1e-9 turns a rounding-level
# gradient (of a weight whose true gradient is 0) into a full +-lr step of either sign, so the test
# uses eps 1e-4, under which such gradients move nothing; weights then agree to ATOL after 3 steps.
ATOL = 1e-5


def test_two_processes_match_one(tiny_data, tmp_path):
    settings = {"max_iters": 3, "save_every": 3, "scst.after_epoch": -1, "optim.eps": 1e-4}
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "ddp", **settings)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "satic", "train", str(config_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single = train(tiny_config_obj(tiny_data, tmp_path / "single", settings))
    assert single.iterations == 3
    two, one = weights(tmp_path / "ddp" / "last"), weights(tmp_path / "single" / "last")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=ATOL, msg=name)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for d in ("ddp", "single")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)


def tiny_config_obj(data, out, settings):
    from satic.config import from_dict
    from satic.training.config import TrainConfig

    return from_dict(TrainConfig, tiny_config(data, out, **settings))


def test_a_ranks_share_of_a_batch_is_its_images_with_their_rows_and_references(tiny_data):
    """Images [1, 3) of a batch of 4 with 2 caption rows each: rows 2..5, and those images' references (a
    rank's SCST rewards score its own images)."""
    import numpy as np

    from satic.data.dataset import CaptionData, CaptionLoader
    from satic.training.data import slice_batch

    batch = next(iter(CaptionLoader(CaptionData.from_dir(tiny_data, tiny_data / "feats_att"), "train", batch_size=4,
                                    seq_per_img=2, seed=1)))
    share = slice_batch(batch, 1, 3)
    assert share.image_ids == batch.image_ids[1:3] and share.indices == batch.indices[1:3]
    assert torch.equal(share.att_feats, batch.att_feats[1:3]) and torch.equal(share.att_masks, batch.att_masks[1:3])
    assert torch.equal(share.labels, batch.labels[2:6]) and torch.equal(share.masks, batch.masks[2:6])
    assert len(share.gts) == 2 and all(np.array_equal(a, b) for a, b in zip(share.gts, batch.gts[1:3]))
