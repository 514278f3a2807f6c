"""Tiny models, a test client over `create_app` and feature helpers shared by the serving tests."""
from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import torch

from satic.captioner import Captioner
from satic.model import ModelConfig, SATModel

WORDS = tuple(f"w{i}" for i in range(1, 13))
DIM = 8
GRID = {"backbone": "efficientnet-lite0", "size": 64, "weights": None}  # 2 x 2 regions of 1280


def tiny_model(seed: int, group_size: int, att_feat_size: int = DIM) -> SATModel:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(WORDS), group_size=group_size, num_layers=1, d_model=16, d_ff=32,
                         num_heads=2, att_feat_size=att_feat_size, max_positions=64)
    return SATModel(config).eval()


def load(path, name: str) -> Captioner:
    captioner = Captioner.load(path)
    captioner.name = name
    return captioner


@contextlib.contextmanager
def serving(models: dict, **settings):
    """A TestClient over the app (lifespan run, so the batcher is started and closed)."""
    from fastapi.testclient import TestClient

    from satic.serve import Limits, ServeSettings, create_app

    limits = settings.pop("limits", {})
    app = create_app(models, ServeSettings(limits=Limits(**limits), **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def regions(rng: np.random.Generator, count: int, dim: int = DIM) -> list[np.ndarray]:
    """`count` images with 1..6 regions each."""
    return [rng.standard_normal((int(rng.integers(1, 7)), dim)).astype(np.float32) for _ in range(count)]


async def until_cancelled(cancelled: list, name: str) -> None:
    """Work that never ends by itself: it notes `name` in `cancelled` as its cancellation arrives."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled.append(name)
        raise
