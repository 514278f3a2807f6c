"""Progress bars advance as batches finish: while a batch is being worked on, the bar shows only the
images of the batches before it (60 images at batch 50: 0 while the first batch runs, 50 during the
last 10, 60 at the end)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from satic.captioner import Captioner
from satic.data import extract
from satic.data.extract import ExtractorSettings, FeatureExtractor, extract_to_store, register_backbone
from satic.data.stores import create_store, open_store
from satic.data.vocab import Vocabulary
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

from test_captioner_images import PatchMeans


def bar_positions() -> list[tuple[int, int]]:
    """(n, total) of every progress bar open now."""
    return [(bar.n, bar.total) for bar in list(tqdm._instances)]


def test_caption_store_bar_counts_finished_batches(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=4, num_layers=1, d_model=8, d_ff=8, num_heads=2, att_feat_size=4,
                                 max_positions=16)).eval()
    captioner = Captioner.load(save_checkpoint(tmp_path / "ckpt", model, Vocabulary(("a", "b", "c", "d"))))
    with create_store(tmp_path / "feats.h5", "hdf5") as writer:
        for i in range(60):
            writer.add(i, np.random.default_rng(i).standard_normal((3, 4)).astype(np.float32))
    seen = []
    decode = captioner.decode

    def watched(*args, **kwargs):
        seen.append(bar_positions())
        return decode(*args, **kwargs)

    monkeypatch.setattr(captioner, "decode", watched)
    with open_store(tmp_path / "feats.h5") as store:
        results = captioner.caption_store(store, batch_size=50, progress=True, max_length=3)
    assert len(results) == 60
    assert seen == [[(0, 60)], [(50, 60)]]


def test_extract_bar_counts_finished_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(extract, "BACKBONES", dict(extract.BACKBONES))
    register_backbone("flat", lambda settings: PatchMeans())
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(paths[-1])
    seen = []
    call = FeatureExtractor.__call__

    def watched(self, images):
        seen.append(bar_positions())
        return call(self, images)

    monkeypatch.setattr(FeatureExtractor, "__call__", watched)
    report = extract_to_store(paths, tmp_path / "grid.h5", ExtractorSettings(backbone="flat", size=32), batch_size=4,
                              progress=True)
    assert report.count == 6
    assert seen == [[(0, 6)], [(4, 6)]]
