"""torchrun with 2 CPU processes (gloo) trains like 1 process on the same global batch."""
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from processes import processes_mentioning

from satic.training.trainer import train
from training_helpers import tiny_config, weights

# The two runs sum the same terms in another order (per-rank partial sums, then an all-reduce), so
# gradients agree to float32 rounding, not bit for bit. Adam with eps 1e-9 turns a rounding-level
# gradient (of a weight whose true gradient is 0) into a full +-lr step of either sign, so the test
# uses eps 1e-4, under which such gradients move nothing; weights then agree to ATOL after 3 steps.
ATOL = 1e-5


def test_two_processes_match_one(tiny_data, tmp_path):
    """Training, and validation, where each rank decodes a share of the split (2 of the 3 images, and 1)."""
    settings = {"max_iters": 3, "save_every": 3, "scst.after_epoch": -1, "optim.eps": 1e-4, "eval.batch_size": 1}
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "ddp", **settings)))
    run = torchrun(tmp_path, 2, "-m", "satic", "train", str(config_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done:") == 1  # rank 0 speaks for the run, not every rank
    single = train(tiny_config_obj(tiny_data, tmp_path / "single", settings))
    assert single.iterations == 3
    two, one = weights(tmp_path / "ddp" / "last"), weights(tmp_path / "single" / "last")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=ATOL, msg=name)
    records = [list(map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())) for d in ("ddp", "single")]
    losses = [[r["loss"] for r in run if r["kind"] == "train"] for run in records]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    (two_val,), (one_val,) = ([r for r in run if r["kind"] == "val"] for run in records)
    assert two_val["CIDEr-D"] == pytest.approx(one_val["CIDEr-D"], rel=1e-6)
    assert two_val["loss"] == pytest.approx(one_val["loss"], rel=1e-5)


def torchrun(tmp_path: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone`, its log folder in the test's (by default it leaves one in the system's /tmp). Past
    the time limit its workers are killed with it (each in a process group of its own): one left waiting for a peer
    would outlive the test."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--log-dir",
               str(tmp_path / "torchrun-logs"), "--nproc_per_node", str(processes), *args]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        for pid in processes_mentioning(str(tmp_path)):  # the workers' command lines name the test's files
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise


def test_a_global_batch_smaller_than_the_world_is_refused_by_name(tiny_data, tmp_path):
    """data.batch_size=1 over 2 processes would leave rank 1 no image (a ZeroDivisionError in its forward):
    one error that names the option and the fix, and no run folder."""
    config_path = tmp_path / "one.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "one", **{"data.batch_size": 1})))
    run = torchrun(tmp_path, 2, "-m", "satic", "train", str(config_path))
    assert run.returncode != 0
    assert ("satic train: error: data.batch_size=1 is the global batch, shared by the 2 torchrun processes, so some "
            "would get no image; set data.batch_size to at least 2, or start at most 1 process (--nproc_per_node)"
            in run.stderr)
    assert "[rank1]: Traceback" not in run.stderr and "[rank0]: Traceback" not in run.stderr
    assert not (tmp_path / "one").exists()


def test_resuming_under_more_processes_gives_the_new_rank_its_own_random_streams(tiny_data, tmp_path):
    """A 1-process run resumed by 2: rank 1 has no saved streams and starts its own, as a fresh run's rank 1
    (a copy of rank 0's would draw the same dropout masks and SCST samples on both), and the run says it will
    not match an uninterrupted one."""
    from satic.training.state import load_state

    settings = {"max_iters": 1, "scst.after_epoch": -1}
    train(tiny_config_obj(tiny_data, tmp_path / "run", settings))
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", **{**settings, "max_iters": 2})))
    run = torchrun(tmp_path, 2, "-m", "satic", "train", str(config_path), "resume=auto")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resume: the run being resumed had 1 process, this one has 2;" in run.stdout
    state = load_state(tmp_path / "run" / "last")
    assert state["progress"]["iteration"] == 2 and len(state["rng"]) == len(state["sampler"]) == 2
    assert not torch.equal(state["sampler"][0], state["sampler"][1])
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    fresh = torch.Generator().manual_seed(1 * 1000 + 1)  # seed 1: rank 1's sampler as a new run seeds it
    assert torch.equal(state["sampler"][1], fresh.get_state())  # XE draws no samples


STAND_IN_REWARD = """import sys

import numpy as np

from satic.cli import main
from satic.training import trainer

# each sample's reward is the number of images in its rank's share: 2 on rank 0, 1 on rank 1
trainer.caption_rewards = lambda seq, gts, *scorers: np.full(len(seq), float(len(gts)))
sys.exit(main())
"""


def test_scst_logs_the_mean_reward_of_every_sample_when_ranks_have_unequal_shares(tiny_data, tmp_path):
    """A global batch of 3 images over 2 ranks (2 + 1), 2 samples each: the logged reward is the mean over
    the 6 samples, (4 x 2 + 2 x 1) / 6, not the mean of the two ranks' means, 1.5."""
    script = tmp_path / "stand_in_reward.py"
    script.write_text(STAND_IN_REWARD)
    config_path = tmp_path / "scst.yaml"
    settings = {"max_iters": 1, "scst.after_epoch": 0, "scst.sample_n": 2, "data.batch_size": 3}
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "scst", **settings)))
    run = torchrun(tmp_path, 2, str(script), "train", str(config_path))
    assert run.returncode == 0, run.stderr[-3000:]
    records = [r for r in map(json.loads, (tmp_path / "scst" / "log.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    assert [r["reward"] for r in records] == [10 / 6]


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


def test_a_run_folder_rank_0_refuses_stops_every_rank_at_once(tiny_data, tmp_path):
    """Rank 0 alone checks out_dir: the others learn its verdict and stop at once, instead of waiting for a rank
    that never joins until torchrun kills them (30 s later)."""
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", max_iters=1)))
    assert train(tiny_config_obj(tiny_data, tmp_path / "run", {"max_iters": 1})).last == tmp_path / "run" / "last"
    run = torchrun(tmp_path, 2, "-m", "satic", "train", str(config_path))
    assert run.returncode != 0
    # not killed after torchrun's 30 s grace (a wall-clock bound would also count a loaded machine's start-up)
    assert "SIGKILL" not in run.stderr, run.stderr
    assert run.stderr.count(f"satic train: error: out_dir {tmp_path / 'run'} already holds a run") == 1, run.stderr
    assert ("satic train: error: rank 1 stopped: rank 0 refused the run (its error is above)" in run.stderr
            or "satic train: terminated" in run.stderr), run.stderr  # torchrun may stop it as rank 0 fails
    assert run.stderr.count("Traceback") == 1, run.stderr  # torchrun's own report of the failed processes


RANK_0_FAILS = """import signal
import sys

import torch

from satic import cli
from satic.errors import SaticError
from satic.training import trainer
from satic.training.distributed import all_sum, barrier


def run(self):
    barrier(self.world)
    if self.world.rank == 0:
        raise SaticError("a failure on rank 0 alone")
    all_sum(torch.zeros(1), self.world)  # rank 0 has gone: gloo reports the closed connection


trainer.Trainer.run = run
if sys.argv[-1] == "ignore-sigterm":  # rank 1 must meet the closed connection, not torchrun's SIGTERM first
    cli._raise_terminated = lambda *args: None
sys.exit(cli.main(sys.argv[1:-1]))
"""


def test_an_error_on_rank_0_after_the_processes_connect_stops_the_others_without_a_traceback(tiny_data, tmp_path):
    """A collective call that finds rank 0 gone is reported in one line, not as a gloo traceback."""
    script = tmp_path / "rank_0_fails.py"
    script.write_text(RANK_0_FAILS)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run")))
    run = torchrun(tmp_path, 2, str(script), "train", str(config_path), "ignore-sigterm")
    assert run.returncode != 0
    assert "satic train: error: a failure on rank 0 alone" in run.stderr, run.stderr
    assert "satic train: error: rank 1 stopped: another process of the run has gone (its error says why): " \
        in run.stderr, run.stderr
    assert run.stderr.count("Traceback") == 1, run.stderr  # torchrun's own report of the failed processes


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_outside_torchrun_a_process_is_rank_0_of_1_and_joins_no_group(monkeypatch):
    import torch.distributed as dist

    from satic.training.distributed import World, init_world, launch_world, rank_0_failed

    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launch_world() == init_world(torch.device("cpu")) == World(0, 1, 0) and not dist.is_initialized()
    assert World().is_main and not World(1, 2).is_main
    assert [rank_0_failed(World(), failed) for failed in (True, False)] == [True, False]  # its own verdict
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert launch_world() == World(3, 4, 0)  # one process per machine: LOCAL_RANK 0 unless set
    monkeypatch.setenv("LOCAL_RANK", "3")  # LOCAL_WORLD_SIZE unset: as many as WORLD_SIZE
    assert launch_world() == World(3, 4, 3)


@pytest.mark.parametrize(("message", "gone"), [("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer", True),
                                               ("Connection reset by peer", True), ("write: Broken pipe", True),
                                               ("CUDA out of memory", False)])
def test_a_collective_calls_error_is_a_lost_peer_only_when_it_says_a_connection_broke(message, gone):
    from satic.training.distributed import lost_peer

    assert lost_peer(RuntimeError(message)) is gone
    assert lost_peer(OSError(message)) is False


def test_all_sum_of_one_process_is_a_detached_copy():
    from satic.training.distributed import World, all_sum

    value = torch.tensor([1.0, 2.0], requires_grad=True)
    total = all_sum(value * 2, World())
    assert total.tolist() == [2.0, 4.0] and not total.requires_grad
    mine = torch.tensor([3.0])
    all_sum(mine, World()).add_(1)
    assert mine.tolist() == [3.0]


def test_a_run_of_several_processes_closes_its_group_and_one_process_leaves_the_callers_alone(tmp_path):
    """rank_0_failed gives rank 0's verdict over the group (another rank's own True is not a verdict); close_world
    ends the run's group, and in one process leaves a group that the caller made (satic joined none)."""
    import torch.distributed as dist

    from satic.training.distributed import World, close_world, rank_0_failed

    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        assert [rank_0_failed(World(0, 2), failed) for failed in (True, False)] == [True, False]
        assert rank_0_failed(World(1, 2), True) is False
        close_world(World())
        assert dist.is_initialized()
        close_world(World(0, 2))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
