import json

import pytest

from satic.cli import main
from satic.data.vocab import Vocabulary
from satic.errors import SaticError
from satic.io import atomic_path, read_json, write_json


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(SaticError, match="nope.json"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SaticError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_cli_unknown_command_exits_nonzero(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0


def test_vocabulary_round_trip_and_decode():
    vocab = Vocabulary.from_ix_to_word({"1": "a", "2": "dog", "3": "UNK"})
    assert vocab.to_ix_to_word() == {"1": "a", "2": "dog", "3": "UNK"}
    assert vocab.decode([1, 2, 0, 2]) == "a dog"
    assert vocab.encode(["a", "cat"]) == [1, 3]
    assert vocab.unk_index == 3 and len(vocab) == 3
    with pytest.raises(SaticError, match="keys must be exactly 1..2"):
        Vocabulary.from_ix_to_word({"1": "a", "3": "b"})
