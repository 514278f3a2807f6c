"""Tiny run configs and helpers shared by the training tests."""
from pathlib import Path

import torch

from satic.config import from_dict
from satic.training.config import TrainConfig

TINY_MODEL = {"group_size": 1, "num_layers": 1, "d_model": 16, "d_ff": 32, "num_heads": 2,
              "dropout": 0.0, "att_dropout": 0.0, "max_positions": 64}


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> dict:
    """A run config dict: 1-layer d_model 16 model, 4 images x 2 captions, no dropout, 1 CPU thread, saved
    where it stops."""
    config = {
        "out_dir": str(out_dir), "seed": 1, "max_iters": 2, "save_every": 100, "save_at_end": True, "log_every": 1,
        "threads": 1, "progress": False,
        "data": {"dir": str(data_dir), "batch_size": 4, "seq_per_img": 2},
        "model": dict(TINY_MODEL),
        "optim": {"schedule": "noam", "noam_warmup": 4, "noam_factor": 1.0},
        "scst": {"sample_n": 2, "max_length": 8},
        "eval": {"max_images": 3, "max_length": 8, "batch_size": 3},
    }
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config


def make_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    return from_dict(TrainConfig, tiny_config(data_dir, out_dir, **overrides))


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))
