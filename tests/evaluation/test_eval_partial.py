"""The file of the captions a stopped `satic caption --out` keeps: its random states, and which file is held."""
from __future__ import annotations

import os

import pytest
import torch

from satic.evaluation import partial
from satic.evaluation.partial import PartialFile, read_partial


def test_a_batch_decoded_on_cuda_keeps_the_device_random_state(tmp_path, monkeypatch):
    """Sampling on a CUDA device draws from that device's generator, not the CPU's: both are kept."""
    asked = []
    state = torch.arange(16, dtype=torch.uint8)

    def cuda_state(device):
        asked.append(device)
        return state

    monkeypatch.setattr(torch.cuda, "get_rng_state", cuda_state)
    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({"seed": 1})
    writer.add([("1", ["a cat"])], draws=True, device=torch.device("cuda", 0))
    writer.close()
    kept = read_partial(path, {"seed": 1}, ["1", "2"])
    assert asked == [torch.device("cuda", 0)]
    assert torch.equal(kept.device_rng, state) and torch.equal(kept.rng, torch.get_rng_state())


def test_no_device_random_state_is_kept_on_the_cpu_or_without_draws(tmp_path):
    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({})
    writer.add([("1", ["a cat"])], draws=True, device=torch.device("cpu"))
    writer.add([("2", ["a dog"])], draws=False, device=torch.device("cuda", 0))
    writer.close()
    assert read_partial(path, {}, ["1", "2"]).device_rng is None


def test_captions_kept_with_their_scores_are_read_back_and_malformed_ones_refused(tmp_path):
    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({"scores": True})
    scored = [{"caption": "a cat", "score": -1.5}, {"caption": "a dog", "score": float("-inf")}]
    writer.add([("1", scored)], draws=False)
    writer.close()
    assert read_partial(path, {"scores": True}, ["1", "2"]).captions == [("1", scored)]
    text = path.read_text()
    for bad in ('{"caption": "a cat", "score": "-1.5"}', '{"caption": "a cat"}', '{"caption": 1, "score": 1}',
                '{"caption": "a cat", "score": true}', '{"caption": "a cat", "score": 1, "tokens": []}'):
        path.write_text(text.replace('{"caption": "a cat", "score": -1.5}', bad))
        with pytest.raises(partial.UnusablePartial, match="is not an image's captions"):
            read_partial(path, {"scores": True}, ["1", "2"])


def test_a_file_with_no_whole_batch_is_not_held_against_other_settings(tmp_path):
    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({"seed": 1})
    writer.close()
    with open(path, "a") as f:
        f.write('{"image_id": "1", "captions": ["cut short"]}\n')
    writer = PartialFile(path)
    assert writer.resume({"seed": 2}, ["1"]) is None
    writer.close()


def test_the_file_held_is_the_one_at_its_path(tmp_path, monkeypatch):
    """A run that finishes removes its file while holding it; another that opened the file just before, and locks
    it once it is let go, holds a removed file: it must take the one at the path instead."""
    path = tmp_path / "out.json.partial.jsonl"
    flock, calls = partial.fcntl.flock, []

    def removed_first(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            path.unlink()
        return flock(fd, operation)

    monkeypatch.setattr(partial.fcntl, "flock", removed_first)
    writer = PartialFile(path)
    try:
        assert os.path.samestat(os.fstat(writer.file.fileno()), os.stat(path))
    finally:
        writer.close()


def test_starting_afresh_refuses_a_file_satic_did_not_write(tmp_path):
    from satic.evaluation.partial import UnusablePartial

    path = tmp_path / "out.json.partial.jsonl"
    path.write_text("notes of my own\n")
    writer = PartialFile(path)
    try:
        with pytest.raises(UnusablePartial, match="is not a file of the captions satic keeps"):
            writer.start({})
    finally:
        writer.close()
    assert path.read_text() == "notes of my own\n"
    path.unlink()
    writer = PartialFile(path)
    writer.start({})
    writer.add([("1", ["a cat"])], draws=False)
    writer.start({"seed": 2})  # one of satic's own: begun afresh
    writer.close()
    assert read_partial(path, {"seed": 2}, ["1"]).captions == []
