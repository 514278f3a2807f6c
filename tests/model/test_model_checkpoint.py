"""Checkpoints: round trip gives identical outputs; every malformed checkpoint is a clear SaticError."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from satic.data.vocab import Vocabulary
from satic.decoding import DecodeOptions, decode
from satic.errors import SaticError
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import FeatureSpec, load_checkpoint, read_checkpoint_config, save_checkpoint

from damage import flip_a_weight_bit

WORDS = tuple(f"w{i}" for i in range(1, 13))


def tiny_model(seed: int = 0, vocab_size: int = len(WORDS), group_size: int = 2) -> SATModel:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, group_size=group_size, num_layers=1, d_model=16, d_ff=32,
                         num_heads=2, att_feat_size=8, max_positions=64)
    return SATModel(config).eval()


@pytest.fixture()
def saved(tmp_path):
    model = tiny_model()
    spec = FeatureSpec(kind="grid", extractor={"backbone": "efficientnet-lite0", "size": 64, "weights": None})
    path = save_checkpoint(tmp_path / "ckpt", model, Vocabulary(WORDS), spec, {"step": 7, "decode": {"max_length": 12}})
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and loaded.vocab.words == WORDS
    assert loaded.features.kind == "grid" and loaded.features.extractor["size"] == 64
    assert loaded.extra == {"step": 7, "decode": {"max_length": 12}}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    feats = torch.randn(3, 5, 8)
    masks = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    for options in (DecodeOptions(), DecodeOptions(beam_size=3)):
        a, b = decode(model, feats, masks, options), decode(loaded.model, feats, masks, options)
        assert torch.equal(a.seq, b.seq) and torch.equal(a.logprobs, b.logprobs)


def test_config_json_is_self_describing(saved):
    _, path = saved
    document = json.loads((path / "config.json").read_text())
    assert document["format"] == "satic-checkpoint" and document["format_version"] == 2
    assert document["weights_sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert document["model"]["vocab_size"] == 12 and document["vocab"]["1"] == "w1"
    assert document["features"] == {"kind": "grid", "norm_att_feat": False, "use_box": False,
                                     "extractor": {"backbone": "efficientnet-lite0", "size": 64, "weights": None}}


def test_overwrite_replaces_both_files(saved):
    _, path = saved
    other = tiny_model(seed=1)
    save_checkpoint(path, other, Vocabulary(WORDS))
    assert torch.equal(load_checkpoint(path).model.generator.weight, other.generator.weight)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files


def edit_config(path, **changes):
    document = json.loads((path / "config.json").read_text())
    document.update(changes)
    (path / "config.json").write_text(json.dumps(document))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "config.json").unlink(), "checkpoint config not found"),
    (lambda p: (p / "model.safetensors").unlink(), "weights not found"),
    (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 40), "not a readable safetensors"),
    (lambda p: edit_config(p, format="something-else"), "not a satic checkpoint"),
    (lambda p: edit_config(p, format_version=3), "format_version 3"),
    (lambda p: edit_config(p, format_version=True), "format_version True"),
    (lambda p: edit_config(p, weights_sha256="F" * 64), "weights_sha256 must be the 64 hexadecimal digits"),
    (lambda p: edit_config(p, weights_sha256=None), "weights_sha256 must be .* got None"),
    (lambda p: edit_config(p, checkpoint_id="0" * 32), "come from different checkpoints"),
    (lambda p: edit_config(p, vocab={str(i): f"w{i}" for i in range(1, 12)}),
     "vocab_size 12 but the vocabulary has 11"),
    (lambda p: edit_config(p, model={**json.loads((p / "config.json").read_text())["model"], "d_model": 24}),
     "do not fit the model"),
    (lambda p: edit_config(p, model={**json.loads((p / "config.json").read_text())["model"], "colour": 1}),
     "unknown key"),
    (lambda p: edit_config(p, features={"kind": "pixels", "norm_att_feat": False, "use_box": False,
                                         "extractor": None}), "features.kind"),
])
def test_malformed_checkpoints_are_named(saved, damage, message):
    _, path = saved
    damage(path)
    with pytest.raises(SaticError, match=message):
        load_checkpoint(path)


def rewrite_weights(path, tensors, metadata=None):
    """model.safetensors written anew by other means, its digest recorded in config.json as a save would."""
    from safetensors.torch import save_file

    save_file(tensors, path / "model.safetensors", metadata=metadata)
    edit_config(path, weights_sha256=hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())


def test_a_weight_changed_after_the_save_is_refused(saved):
    _, path = saved
    flip_a_weight_bit(path)
    with pytest.raises(SaticError, match="model.safetensors is damaged: its SHA-256 is not the weights_sha256"):
        load_checkpoint(path)


def test_a_loaded_model_keeps_its_weights_when_the_file_is_written_over_in_place(saved):
    """The model owns its weights: writing another checkpoint over the file (as `cp` does: same file, new bytes)
    while the model is in use changes nothing in it."""
    model, path = saved
    loaded = load_checkpoint(path).model
    size = (path / "model.safetensors").stat().st_size
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_a_version_1_checkpoint_loads_without_the_digest(saved):
    """Checkpoints saved before the digest load as they did, so the same damage goes unseen there."""
    model, path = saved
    document = json.loads((path / "config.json").read_text())
    del document["weights_sha256"]
    (path / "config.json").write_text(json.dumps({**document, "format_version": 1}))
    loaded = load_checkpoint(path).model.state_dict()
    assert all(torch.equal(tensor, loaded[name]) for name, tensor in model.state_dict().items())
    flip_a_weight_bit(path)
    changed = [name for name, tensor in load_checkpoint(path).model.state_dict().items()
               if not torch.equal(tensor, loaded[name])]
    assert changed == ["generator.weight"]


def test_a_checkpoint_in_a_folder_named_in_another_encoding_says_to_rename_it(tmp_path):
    """satic saves into a folder whose name is not UTF-8 (Latin-1 "café", as Python decodes it), but safetensors opens
    only UTF-8 paths: loading says so and what to do, not that the checkpoint is damaged."""
    path = save_checkpoint(tmp_path / os.fsdecode(b"caf\xe9") / "ckpt", tiny_model(), Vocabulary(WORDS))
    with pytest.raises(SaticError, match="safetensors opens only paths that are UTF-8 text") as raised:
        load_checkpoint(path)
    assert "re-save" not in str(raised.value)
    utf8 = save_checkpoint(tmp_path / "café" / "ckpt", tiny_model(), Vocabulary(WORDS))  # UTF-8: loads in any locale
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join(sys.path)}  # an ASCII locale, where Python reads "é" as two surrogates
    done = subprocess.run([sys.executable, "-c", "import sys; from satic.model.checkpoint import load_checkpoint; "
                           "load_checkpoint(sys.argv[1])", str(utf8)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_weights_of_a_bigger_vocabulary_are_refused(saved, tmp_path):
    _, path = saved
    bigger = save_checkpoint(tmp_path / "big", tiny_model(vocab_size=14), Vocabulary(WORDS + ("x", "y")))
    (path / "model.safetensors").unlink()
    (bigger / "model.safetensors").rename(path / "model.safetensors")
    edit_config(path, **{key: json.loads((bigger / "config.json").read_text())[key]
                         for key in ("checkpoint_id", "weights_sha256")})
    with pytest.raises(SaticError, match="generator.weight"):
        load_checkpoint(path)


def test_missing_directory_and_vocab_mismatch_on_save(tmp_path):
    with pytest.raises(SaticError, match="checkpoint directory not found"):
        read_checkpoint_config(tmp_path / "nowhere")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    with pytest.raises(SaticError, match="data is not a satic checkpoint: it has no config.json or model.safetensors"):
        read_checkpoint_config(tmp_path / "data")
    with pytest.raises(SaticError, match=r"dataset.json is a file; give the checkpoint folder"):
        read_checkpoint_config(tmp_path / "data" / "dataset.json")
    with pytest.raises(SaticError, match="the vocabulary has 3"):
        save_checkpoint(tmp_path / "c", tiny_model(), Vocabulary(("a", "b", "c")))
    with pytest.raises(SaticError, match="extra must hold plain JSON values"):
        save_checkpoint(tmp_path / "c", tiny_model(), Vocabulary(WORDS), extra={"score": torch.tensor(1.0)})
    assert not (tmp_path / "c").exists()


def test_a_run_folder_or_a_pth_file_is_named_with_what_to_give_instead(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "best", tiny_model(), Vocabulary(WORDS))
    (run / "config.json").write_text("{}")  # a run folder holds the training config beside best/ and last/
    with pytest.raises(SaticError) as info:
        load_checkpoint(run)
    assert str(info.value) == f"{run} is a training run folder; give one of its checkpoints: {run / 'best'}"
    assert load_checkpoint(run / "best").config.group_size == 2
    pth = tmp_path / "model-best.pth"
    torch.save({"w": torch.zeros(1)}, pth)
    with pytest.raises(SaticError, match=r"model-best.pth is a PyTorch file, not a satic checkpoint folder; .*"
                                         r"`satic import-reference --model M --infos I --out DIR`"):
        load_checkpoint(pth)


MISSING_FIELDS = [("model", key, f"missing key(s) ['{key}']")
                  for key in ("group_size", "d_model", "vocab_size", "max_positions")]
# a features default would silently feed a grid model bottom-up features (or drop its boxes)
MISSING_FIELDS += [("features", key, f"config.json: features lacks {key}; a checkpoint must say")
                   for key in ("kind", "norm_att_feat", "use_box", "extractor")]


@pytest.mark.parametrize("section, key, said", MISSING_FIELDS, ids=[f"{s}.{k}" for s, k, _ in MISSING_FIELDS])
def test_a_config_without_a_field_is_refused_naming_it(saved, section, key, said):
    _, path = saved
    fields = json.loads((path / "config.json").read_text())[section]
    del fields[key]
    edit_config(path, **{section: fields})
    with pytest.raises(SaticError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert said in message and "config.json" in message and "\n" not in message


def test_weights_and_config_of_two_checkpoints_are_named_as_such(saved, tmp_path):
    _, path = saved
    other = save_checkpoint(tmp_path / "other", tiny_model(seed=1), Vocabulary(WORDS))
    (other / "model.safetensors").replace(path / "model.safetensors")
    with pytest.raises(SaticError, match="come from different checkpoints") as info:
        load_checkpoint(path)
    assert "interrupted" not in str(info.value)


def test_damaged_weights_are_refused_naming_the_tensor(saved):
    """NaN, integers in place of floats, or weights re-saved without satic's metadata: each refused with what is
    wrong, not decoded into empty captions."""
    from safetensors.torch import load_file

    _, path = saved
    weights_file = path / "model.safetensors"
    original, digest = weights_file.read_bytes(), read_checkpoint_config(path)["weights_sha256"]
    metadata = {"checkpoint_id": read_checkpoint_config(path)["checkpoint_id"]}
    tensors = {name: t.clone() for name, t in load_file(weights_file).items()}  # not views of the file rewritten below
    damaged = dict(tensors)
    damaged["generator.bias"] = damaged["generator.bias"].clone()
    damaged["generator.bias"][2] = float("nan")
    rewrite_weights(path, damaged, metadata)
    with pytest.raises(SaticError, match=r"model.safetensors hold NaN or Inf \(generator.bias\); the checkpoint is "
                                         r"damaged"):
        load_checkpoint(path)
    rewrite_weights(path, {name: t.to(torch.int64) if name.endswith("bias") else t for name, t in tensors.items()},
                    metadata)
    with pytest.raises(SaticError, match=r"do not fit the model .*: \S+\.bias is I64, not floating point; "
                                         r".* and 17 more$"):
        load_checkpoint(path)
    rewrite_weights(path, tensors)
    with pytest.raises(SaticError, match=r"model.safetensors carries no checkpoint id, so nothing ties it to "):
        load_checkpoint(path)
    rewrite_weights(path, {name: t.to(torch.bfloat16) for name, t in tensors.items()}, metadata)
    assert load_checkpoint(path).model.generator.bias.dtype == torch.float32  # a float of any width loads
    weights_file.write_bytes(original)
    edit_config(path, weights_sha256=digest)
    load_checkpoint(path)


def test_weights_of_another_shape_are_named_in_one_short_line(saved):
    _, path = saved
    edit_config(path, model={**json.loads((path / "config.json").read_text())["model"], "d_model": 24})
    with pytest.raises(SaticError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "do not fit the model" in message and "\n" not in message and len(message) < 600
    shape = r"\(\d+(, \d+)*,?\)"  # the first three names, each with its shape in the file and the model's
    assert re.search(rf"config.json: ([\w.]+ is {shape}, expected {shape}; ){{2}}[\w.]+ is {shape}, expected {shape} "
                     rf"and \d+ more$", message), message



@pytest.mark.parametrize("field, value, message", [
    ("d_model", 2**24, r"weights in \S+model.safetensors do not fit the model described by \S+config.json: "
                       r"region_embed.weight is \(16, 8\), expected \(16777216, 8\); "),
    ("num_layers", 10**9, r"do not fit the model described by \S+config.json: model.num_layers 1000000000 needs more "
                          r"tensors than the 41 stored$"),
    ("d_model", 2**70, r"config.json: cannot build the model it describes \(TypeError: .*\); the checkpoint is "
                       r"damaged, re-save it$"),
    ("max_positions", 2**40, r"config.json describes a model \(num_layers 1, d_model 16, d_ff 32, max_positions "
                             r"1099511627776\) of 65,536.0 GiB, more than the [\d,.]+ GiB of cpu; if a size in it is "
                             r"damaged, re-save the checkpoint$"),
], ids=["d_model", "num_layers", "d_model-past-int64", "max_positions"])
def test_a_size_damaged_in_config_json_is_named_before_a_model_of_that_size_is_made(saved, field, value, message):
    """Sizes are checked against the weights' header on a model without storage: a damaged one is named, not
    allocated (gigabytes, or a memory error), built layer by layer, or passed to torch as a number it cannot hold."""
    _, path = saved
    edit_config(path, model={**json.loads((path / "config.json").read_text())["model"], field: value})
    with pytest.raises(SaticError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("changes, message", [
    ({"vocab": ["a"]}, r"vocab must be a mapping of word indices to words .*got a list; .*re-save it"),
    ({"vocab": "abc"}, r"vocab must be a mapping .*got a string"),
    ({"vocab": {**{str(i): f"w{i}" for i in range(1, 13)}, "3": [1]}}, r"ix_to_word\['3'\] is \[1\]; .*re-save"),
    ({"extra": [1, 2]}, r"extra must be a mapping .*got a list"),
    ({"extra": "x"}, r"extra must be a mapping .*got a string"),
    ({"extra": {"decode": [1]}}, r"extra.decode must be a mapping"),
    ({"features": {"kind": "bottom-up", "norm_att_feat": False, "use_box": False, "extractor": 5}},
     r"features: extractor must be null or a mapping .*got 5; re-save"),
    ({"model": [1]}, r"model must be a mapping"),
])
def test_fields_of_the_wrong_type_are_named(saved, changes, message):
    _, path = saved
    edit_config(path, **changes)
    with pytest.raises(SaticError, match=message) as info:
        load_checkpoint(path)
    assert str(path / "config.json") in str(info.value)


def test_a_checkpoint_without_extra_still_loads(saved):
    _, path = saved
    document = json.loads((path / "config.json").read_text())
    del document["extra"]
    (path / "config.json").write_text(json.dumps(document))
    assert load_checkpoint(path).extra == {}


def test_a_grid_feature_spec_needs_its_extractor(saved):
    with pytest.raises(ValueError, match="grid features need the extractor settings"):
        FeatureSpec(kind="grid")
    _, path = saved
    edit_config(path, features={"kind": "grid", "norm_att_feat": False, "use_box": False, "extractor": None})
    with pytest.raises(SaticError, match="grid features need the extractor settings"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, read, message", [
    ("format_version", load_checkpoint, "has format_version None; this satic reads versions 1 and 2"),
    ("features", read_checkpoint_config, r"lacks \['features'\]; the checkpoint is damaged"),
    ("weights_sha256", read_checkpoint_config, r"lacks \['weights_sha256'\]; the checkpoint is damaged"),
])
def test_a_config_without_a_format_field_is_refused(saved, key, read, message):
    _, path = saved
    document = json.loads((path / "config.json").read_text())
    del document[key]
    (path / "config.json").write_text(json.dumps(document))
    with pytest.raises(SaticError, match=message):
        read(path)


@pytest.mark.parametrize("key", ["model", "vocab", "features"])
def test_a_null_section_is_named(saved, key):
    _, path = saved
    edit_config(path, **{key: None})
    with pytest.raises(SaticError, match=rf"config.json: {key} must be a mapping of .*got null"):
        load_checkpoint(path)


def test_a_boolean_is_named_as_such(saved):
    _, path = saved
    edit_config(path, extra=True)
    with pytest.raises(SaticError, match=r"extra must be a mapping .*got a boolean"):
        load_checkpoint(path)


def test_layout_differences_skips_optional_names_only_when_missing():
    from satic.model.checkpoint import layout_differences

    wanted = {"a": torch.zeros(2, 3), "n": torch.zeros(())}
    assert layout_differences(wanted, {"a": (2, 3)}, optional=["n"]) == []
    assert layout_differences(wanted, {"a": (2, 3)}) == ["n missing"]
    assert layout_differences(wanted, {"a": torch.zeros(3, 2), "n": "x", "b": 1}, optional=["n"]) == [
        "b unexpected", "a is (3, 2), expected (2, 3)", "n is str, expected ()"]


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".pkl"])
def test_a_pickled_torch_file_of_any_usual_suffix_is_named_as_such(tmp_path, suffix):
    path = tmp_path / f"model-best{suffix}"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(SaticError, match=rf"model-best\{suffix} is a PyTorch file, not a satic checkpoint folder"):
        read_checkpoint_config(path)


def test_a_checkpoint_folder_named_like_a_torch_file_loads(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", tiny_model(), Vocabulary(WORDS))
    assert load_checkpoint(path).vocab.words == WORDS


def test_a_file_of_a_checkpoint_given_in_place_of_its_folder_names_the_folder(saved):
    _, path = saved
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(SaticError) as info:
            read_checkpoint_config(path / name)
        assert str(info.value) == (f"{path / name} is a file; give the checkpoint folder that holds config.json and "
                                   f"model.safetensors ({path})")


@pytest.mark.parametrize("saved_ones", [["last"], ["best", "last"]])
def test_a_run_folder_names_each_checkpoint_it_holds(tmp_path, saved_ones):
    run = tmp_path / "run"
    for name in saved_ones:
        save_checkpoint(run / name, tiny_model(), Vocabulary(WORDS))
    with pytest.raises(SaticError) as info:
        read_checkpoint_config(run)
    assert str(info.value) == (f"{run} is a training run folder; give one of its checkpoints: "
                               + " or ".join(str(run / name) for name in saved_ones))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_weights_stored_as_floats_of_another_width_load_as_the_models_floats(saved, dtype):
    from safetensors.torch import load_file

    model, path = saved
    metadata = {"checkpoint_id": read_checkpoint_config(path)["checkpoint_id"]}
    tensors = {name: t.clone().to(dtype) for name, t in load_file(path / "model.safetensors").items()}
    rewrite_weights(path, tensors, metadata)
    loaded = load_checkpoint(path).model
    assert loaded.generator.weight.dtype == torch.float32
    assert torch.equal(loaded.generator.weight, model.generator.weight.to(dtype).float())


def test_a_config_json_that_is_not_a_mapping_is_not_a_checkpoint_config(saved):
    _, path = saved
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(SaticError) as info:
        read_checkpoint_config(path)
    assert str(info.value) == (f"{path / 'config.json'} is not a satic checkpoint config (format should be "
                               "'satic-checkpoint'); convert reference checkpoints with `satic import-reference`")


def test_a_checkpoint_folder_that_also_holds_a_best_checkpoint_loads_as_itself(saved):
    model, path = saved
    save_checkpoint(path / "best", tiny_model(seed=1), Vocabulary(WORDS))
    assert torch.equal(load_checkpoint(path).model.generator.weight, model.generator.weight)


def test_a_checkpoint_is_not_saved_over_a_file(tmp_path):
    (tmp_path / "ckpt").write_text("mine")
    with pytest.raises(SaticError) as info:
        save_checkpoint(tmp_path / "ckpt", tiny_model(), Vocabulary(WORDS))
    assert str(info.value).startswith(f"checkpoint directory {tmp_path / 'ckpt'} is a file; give a directory")
    assert (tmp_path / "ckpt").read_text() == "mine"


def test_loading_and_captioning_import_no_compiler(tmp_path):
    """A checkpoint's layout is checked on a model without storage (the meta device) before its weights are read.
    torch runs some ops there (normal_, arange) through torch._dynamo, whose import would add over a second to every
    command that loads a checkpoint: the model computes nothing on that device."""
    config = ModelConfig(vocab_size=3, num_layers=1, d_model=16, d_ff=32, num_heads=2, att_feat_size=8)
    checkpoint = save_checkpoint(tmp_path / "ckpt", SATModel(config), Vocabulary(("a", "b", "c")))
    script = ("import sys, torch; from satic.captioner import Captioner; "
              "print(Captioner.load(sys.argv[1]).caption(torch.ones(1, 4, 8))); "
              "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(checkpoint)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"
    with torch.device("meta"):
        shell = SATModel(config)
    assert shell.positions.is_meta and shell.positions.shape == (config.max_positions, 16)
    assert all(p.is_meta for p in shell.parameters())
