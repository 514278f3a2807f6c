"""The file of the captions a stopped `satic caption --out` keeps: its random states, and which file is held."""
from __future__ import annotations

import json
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


def test_the_file_held_is_the_one_at_its_path(tmp_path, removed_before_its_first_lock):
    """A run that finishes removes its file while holding it; another that opened the file just before, and locks
    it once it is let go, holds a removed file: it must take the one at the path instead."""
    path = tmp_path / "out.json.partial.jsonl"
    removed_before_its_first_lock(path)
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


def test_resuming_drops_a_batch_cut_short_and_goes_on_after_the_whole_ones(tmp_path):
    from satic.evaluation.partial import partial_path

    path = partial_path(tmp_path / "out.json")
    assert path == tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    assert writer.resume({"seed": 1}, ["1"]) is None  # a new, empty file: nothing to go on from
    writer.start({"seed": 1})
    writer.add([("1", ["a cat"]), ("2", ["a dog"])], draws=False)
    writer.close()
    whole = path.read_bytes()
    with open(path, "a") as f:  # a batch that a kill cut short, its last line half written
        f.write('{"image_id": "3", "captions": ["cut short"]}\n{"image_id": "4", "capt')
    writer = PartialFile(path)
    kept = writer.resume({"seed": 1}, ["1", "2", "3", "4"])
    assert kept.captions == [("1", ["a cat"]), ("2", ["a dog"])] and kept.end == len(whole)
    assert path.read_bytes() == whole
    writer.add([("3", ["a bird"])], draws=True, stamps=["stamp 3"])  # on the CPU: no device of its own
    writer.close()
    closing = json.loads(path.read_text().splitlines()[-1])
    assert closing["images"] == 3 and closing["device_rng"] is None and closing["stamps"] == ["stamp 3"]
    kept = read_partial(path, {"seed": 1}, ["1", "2", "3", "4"])
    assert [i for i, _ in kept.captions] == ["1", "2", "3"] and kept.stamps == [None, None, "stamp 3"]
    assert torch.equal(kept.rng, torch.get_rng_state())


def test_kept_captions_of_other_settings_or_other_images_are_refused(tmp_path):
    from satic.evaluation.partial import FORMAT, UnusablePartial

    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({"seed": 1})
    writer.add([("1", ["a cat"])], draws=False)
    writer.close()
    fix = f"delete {path} or give --overwrite to caption every image afresh"
    with pytest.raises(UnusablePartial) as info:
        read_partial(path, {"seed": 2}, ["1"])
    assert str(info.value) == (f"{path} holds the captions of an interrupted `satic caption` with other settings "
                               f"(seed differ); run it again as it was to finish it, or {fix}")
    with pytest.raises(UnusablePartial) as info:
        read_partial(path, {"seed": 1}, ["2", "1"])
    assert str(info.value) == f"{path} holds the captions of other images than the first 1 of this run; {fix}"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps({"format": FORMAT}), *lines[1:]]) + "\n")
    with pytest.raises(UnusablePartial) as info:
        read_partial(path, {"seed": 1}, ["1"])
    assert str(info.value) == f"{path}: its header holds no settings; {fix}"


def test_a_random_state_is_set_on_the_device_it_was_kept_for_only(monkeypatch):
    set_on = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: set_on.append(("mps", None)))
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.arange(4, dtype=torch.uint8))
    state = torch.arange(16, dtype=torch.uint8)
    partial.set_device_random_state(torch.device("cpu"), state)
    assert set_on == []
    partial.set_device_random_state(torch.device("cuda", 1), state)
    partial.set_device_random_state(torch.device("mps"), state)
    assert set_on == [("cuda", torch.device("cuda", 1)), ("mps", None)]
    assert torch.equal(partial.device_random_state(torch.device("mps")), torch.arange(4, dtype=torch.uint8))
    assert partial.device_random_state(torch.device("cpu")) is None


def test_a_removed_file_is_gone_and_let_go(tmp_path):
    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({})
    writer.remove()
    assert not path.exists() and writer.file.closed
    writer = PartialFile(path)
    path.unlink()  # removed by hand while held: removing it is still no error
    writer.remove()


def try_to_hold(path, result):
    """A forked process's attempt to hold the partial file: "held", or "in use"."""
    try:
        PartialFile(path).close()
        result.put("held")
    except partial.PartialInUse:
        result.put("in use")


def test_a_second_process_cannot_hold_the_file_until_the_first_lets_go(tmp_path):
    import multiprocessing

    path = tmp_path / "out.json.partial.jsonl"
    fork = multiprocessing.get_context("fork")
    writer = PartialFile(path)
    for expected in ("in use", "held"):
        result = fork.Queue()
        other = fork.Process(target=try_to_hold, args=(path, result))
        other.start()
        assert result.get(timeout=30) == expected
        other.join(30)
        writer.close()  # the first lets go: the next process holds it


def test_a_file_of_another_format_is_neither_read_nor_begun_afresh(tmp_path):
    from satic.evaluation.partial import UnusablePartial

    path = tmp_path / "out.json.partial.jsonl"
    for header in ('[]', '{"format": "another program 1", "settings": {}}'):
        path.write_text(header + '\n{"image_id": "1", "captions": ["a cat"]}\n{"images": 1, "rng": null}\n')
        with pytest.raises(UnusablePartial) as info:  # not "--overwrite", which would refuse it as well
            read_partial(path, {}, ["1"])
        assert str(info.value) == (f"{path} is not a file of the captions satic keeps for an interrupted "
                                   "`satic caption`; move it away")
        writer = PartialFile(path)
        try:
            with pytest.raises(UnusablePartial, match="is not a file of the captions satic keeps"):
                writer.start({})
        finally:
            writer.close()


@pytest.mark.parametrize("line, why", [
    ('{"image_id": 1, "captions": ["a cat"]}', "is not an image's captions"),
    ('{"image_id": "1", "captions": "a cat"}', "is not an image's captions"),
    ('{"images": 2, "rng": null}', "a batch ends at image 2 after 1"),
    ('{"images": 1, "rng": null, "stamps": ["a", "b"]}', "a batch of 1 images ends with 2 file stamps"),
])
def test_a_malformed_line_is_refused(tmp_path, line, why):
    from satic.evaluation.partial import FORMAT

    path = tmp_path / "out.json.partial.jsonl"
    good = ['{"image_id": "1", "captions": ["a cat"]}', '{"images": 1, "rng": null}']
    lines = [good[0], line] if line.startswith('{"images"') else [line, good[1]]
    path.write_text("\n".join([json.dumps({"format": FORMAT, "settings": {}}), *lines]) + "\n")
    with pytest.raises(partial.UnusablePartial, match=f"^{path}: not the captions of an interrupted `satic caption` "
                                                      rf"\(.*{why}.*\); delete"):
        read_partial(path, {}, ["1"])


def test_a_write_cut_off_part_way_leaves_the_file_ending_with_a_whole_batch(tmp_path, monkeypatch):
    import errno

    from satic.errors import SaticError

    path = tmp_path / "out.json.partial.jsonl"
    writer = PartialFile(path)
    writer.start({})
    writer.add([("1", ["a cat"])], draws=False)
    whole = path.read_bytes()
    write = os.write

    def disk_full(fd, data):
        if len(data) > 10:
            return write(fd, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(partial.os, "write", disk_full)
    with pytest.raises(SaticError, match=f"^cannot write {path}: No space left on device"):
        writer.add([("2", ["a dog"])], draws=False)
    writer.close()
    assert path.read_bytes() == whole
