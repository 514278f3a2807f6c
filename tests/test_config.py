from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from satic.config import apply_overrides, from_dict, load_config, to_dict
from satic.errors import SaticError


@dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["noam", "step"] = "noam"


@dataclass
class Run:
    out_dir: str = "runs/x"
    seed: int = 0
    resume: Optional[str] = None
    layers: tuple[int, ...] = (1, 2)
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 2\n")
    cfg = load_config(Run, path, ["optim.schedule=step", "layers=[4, 5]", "resume=auto"])
    assert cfg == Run(seed=3, resume="auto", layers=(4, 5), optim=Optim(lr=2.0, schedule="step"))
    assert isinstance(cfg.optim.lr, float)
    assert to_dict(cfg) == {"out_dir": "runs/x", "seed": 3, "resume": "auto", "layers": [4, 5],
                            "optim": {"lr": 2.0, "schedule": "step"}}
    assert from_dict(Run, to_dict(cfg)) == cfg
    assert load_config(Run, None, ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["sed=1"], "unknown key(s) ['sed']"),
    (["optim.rate=1"], "unknown key(s) ['rate']"),
    (["seed=1.5"], "expected an integer"),
    (["optim.lr=fast"], "expected a number"),
    (["optim.schedule=cosine"], "is not one of"),
    (["seed=-1"], "seed must be >= 0"),
    (["seed"], "not of the form key=value"),
])
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(SaticError, match=None) as info:
        load_config(Run, None, overrides)
    assert message in str(info.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(SaticError, match="config file not found"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(SaticError, match="^config file /dev/null is a character device, not a regular file; give the "
                                         "file itself$"):
        load_config(Run, "/dev/null")  # it exists: not "not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(SaticError, match="not valid YAML") as info:
        load_config(Run, bad)
    assert f'in "{bad}", line 2' in str(info.value) and "<unicode string>" not in str(info.value)
    bad.write_text("seed: 1\noptim:\n\tlr: 2\n")
    with pytest.raises(SaticError, match="indent with spaces: YAML does not allow tabs"):
        load_config(Run, bad)
    bad.write_bytes(b"\xff\xfe seed: 1")
    with pytest.raises(SaticError, match=f"config file {bad} is not UTF-8 text"):
        load_config(Run, bad)
    bad.write_text("seed: 1\nout_dir: a\nseed: 2\n")  # PyYAML alone keeps the last without a word
    with pytest.raises(SaticError,
                       match=rf"^config file {bad}: key 'seed' is given twice \(lines 1 and 3\); keep one$"):
        load_config(Run, bad)
    from satic.config import read_yaml

    merged = tmp_path / "merged.yaml"  # a merge key's values may be overridden: that is no duplicate
    merged.write_text("base: &b {seed: 1, lr: 2}\nrun:\n  <<: *b\n  seed: 2\n")
    assert read_yaml(merged)["run"] == {"seed": 2, "lr": 2}
    merged.write_text("a: &a {x: 1}\ndefaults:\n  inner: &b\n    <<: *a\n    x: 5\nrun:\n  <<: *b\n")  # nested
    assert read_yaml(merged) == yaml.safe_load(merged.read_text())  # loaded as PyYAML loads it
    merged.write_text("1: a\n0x1: b\n")  # one key, written two ways
    with pytest.raises(SaticError, match="key '0x1' is given twice"):
        read_yaml(merged)
    merged.write_text("run:\n  - {x: 1, y: 2, x: 3}\n")  # inside a list, in flow style
    with pytest.raises(SaticError, match="key 'x' is given twice"):
        read_yaml(merged)


def test_overrides_do_not_mutate_input():
    data = {"optim": {"lr": 1}}
    assert apply_overrides(data, ["optim.lr=2"]) == {"optim": {"lr": 2}}
    assert data == {"optim": {"lr": 1}}


def test_a_mapping_given_for_a_section_is_merged_into_it(tmp_path):
    """`optim={lr: 0.5}` sets what `optim.lr=0.5` sets: the file's schedule stays, not the default's."""
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 2\n  schedule: step\n")
    merged = load_config(Run, path, ["optim={lr: 0.5}"])
    assert merged == load_config(Run, path, ["optim.lr=0.5"]) == Run(seed=3, optim=Optim(lr=0.5, schedule="step"))
    assert apply_overrides({"a": {"b": {"c": 1, "d": 2}, "e": 3}}, ["a={b: {c: 5}}"]) == {
        "a": {"b": {"c": 5, "d": 2}, "e": 3}}
    assert apply_overrides({"a": {"b": 1}}, ["a=null"]) == {"a": None}  # anything but a mapping replaces
    from satic.training.config import TrainConfig

    path.write_text("max_iters: 1\nmodel:\n  d_model: 64\n  num_heads: 4\n")
    assert load_config(TrainConfig, path, ["model={group_size: 2}"]).model == load_config(
        TrainConfig, path, ["model.group_size=2"]).model


def test_a_mapping_override_is_checked_as_merged_not_as_the_whole_section(tmp_path):
    """`scst={cider_weight: 0}` merges as `scst.cider_weight=0` does: beside the file's bleu_weight it is valid,
    and a section the merge leaves invalid is a message naming the check, not a traceback."""
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 1\nscst:\n  bleu_weight: 1\n")
    merged = load_config(TrainConfig, path, ["scst={cider_weight: 0}"])
    assert merged == load_config(TrainConfig, path, ["scst.cider_weight=0"])
    assert (merged.scst.cider_weight, merged.scst.bleu_weight) == (0.0, 1.0)
    with pytest.raises(SaticError, match=r"scst.cider_weight and scst.bleu_weight are both 0"):
        load_config(TrainConfig, path, ["scst={cider_weight: 0, bleu_weight: 0}"])
    with pytest.raises(SaticError, match=r"eval.beam_size must be >= 1, got 0"):
        load_config(TrainConfig, path, ["eval={beam_size: 0}"])
    with pytest.raises(SaticError, match=r"^override 'eval=\{beams: 2\}': unknown key\(s\) \['beams'\] in "
                                         r"section eval"):
        load_config(TrainConfig, path, ["eval={beams: 2}"])
    with pytest.raises(SaticError, match=r"^override 'scst=\{sample_n: x\}': expected an integer, got 'x'$"):
        load_config(TrainConfig, path, ["scst={sample_n: x}"])


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "override 'seed=abc': expected an integer, got 'abc'"),
    ("optim.lr=fast", "override 'optim.lr=fast': expected a number"),
    ("optim.rate=1", "override 'optim.rate=1': unknown key(s) ['rate'] in section optim"),
])
def test_a_bad_override_is_named_as_the_override_not_as_the_file(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(SaticError) as info:
        load_config(Run, path, [override])
    assert str(info.value).startswith(message)
    assert "run.yaml" not in str(info.value)
    path.write_text("seed: abc\n")  # a bad value in the file is still named by the file
    with pytest.raises(SaticError, match=r"run.yaml.seed: expected an integer"):
        load_config(Run, path)


@pytest.mark.parametrize("override, message", [
    ("model.num_layer=2", "override 'model.num_layer=2': model: unknown key(s) ['num_layer']; valid keys are "
                          "['att_dropout', 'd_ff', 'd_model', 'dropout', 'group_size', 'max_positions', 'num_heads', "
                          "'num_layers']"),
    ("model.d_model=abc", "override 'model.d_model=abc': expected an integer, got 'abc'"),
    ("model.vocab_size=9", "override 'model.vocab_size=9': model.vocab_size comes from the data"),
])
def test_a_bad_override_of_the_model_section_is_named_as_the_override(override, message):
    from satic.config import configs_dir
    from satic.training.config import TrainConfig

    with pytest.raises(SaticError) as info:
        load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml", [override])
    assert str(info.value).startswith(message) and "teacher_xe.yaml" not in str(info.value)
    assert load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml", ["model.num_layers=3"]).model[
        "num_layers"] == 3


def test_complete_configs_name_each_missing_key():
    assert from_dict(Optim, {"lr": 1.0}) == Optim(lr=1.0)  # defaults fill in by default
    with pytest.raises(SaticError, match=r"saved: missing key\(s\) \['schedule'\]"):
        from_dict(Optim, {"lr": 1.0}, "saved", complete=True)


@dataclass
class Outer:
    optim: Optim = field(default_factory=Optim)
    run: Run = field(default_factory=Run)


def test_a_sections_own_check_is_named_by_the_file_and_the_dotted_key(tmp_path):
    path = tmp_path / "outer.yaml"
    path.write_text("run:\n  seed: -2\n")
    with pytest.raises(SaticError) as info:
        load_config(Outer, path)
    assert str(info.value) == f"{path}: seed must be >= 0"


@pytest.mark.parametrize("override, message", [
    ("eval.beam_size=0", "eval.beam_size must be >= 1, got 0"),
    ("eval.max_length=0", "eval.max_length must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("eval.max_images=0", "eval.max_images must be -1 (the whole split) or >= 1, got 0"),
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("save_every=0", "save_every must be >= 1, got 0"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("data.seq_per_img=0", "data.seq_per_img must be >= 1, got 0"),
    ("optim.accum_steps=0", "optim.accum_steps must be >= 1, got 0"),
    ("optim.noam_warmup=0", "optim.noam_warmup must be >= 1, got 0"),
    ("threads=-1", "threads must be >= 0, got -1"),
    ("threads=2147483648", "threads must be at most 1024 (torch CPU threads per process; 0 = torch's default), "
                           "got 2147483648"),  # past a C int: torch's set_num_threads raised OverflowError
    ("threads=100000", "threads must be at most 1024"),  # a thread pool that large ran out of memory
    ("max_epochs=-2", "max_epochs must be >= -1, got -2"),
    ("max_iters=-3", "max_iters must be >= -1, got -3"),  # not taken for -1 with max_epochs -1
    ("out_dir=", "out_dir is empty; give the folder the run writes to"),  # it would write into the current folder
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("data.num_workers=1000000", "data.num_workers must be at most 256 (DataLoader worker processes; 0 = load in "
                                 "the training process), got 1000000"),  # forked one by one, the run never began
    ("data.builtin.seed=-1", "data.builtin.seed must be >= 0, got -1"),  # numpy's generators refuse it
    ("seed=4294967296", "seed must be 0 to 4294967295 (2**32 - 1), got 4294967296"),  # numpy's global generator's
    ("data.builtin.feature_dim=0", "data.builtin.feature_dim must be >= 1, got 0"),
    ("optim.lr=-0.1", "optim.lr must be >= 0, got -0.1"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0: with 0 Adam divides 0 by 0"),  # NaN at the second step
    ("optim.eps=-1e-8", "optim.eps must be > 0, got -1e-08"),
    ("optim.decay_every=0", "optim.decay_every must be >= 1, got 0"),
    ("optim.plateau_factor=1", "optim.plateau_factor in (0, 1); got 1.0, 0.8 and 1.0"),
    ("optim.plateau_factor=0", "optim.plateau_factor in (0, 1); got 1.0, 0.8 and 0.0"),
    ("optim.decay_rate=0", "optim.decay_rate must be > 0 and optim.plateau_factor in (0, 1); got 1.0, 0.0 and 0.5"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
    ("optim.betas=[0.9,1]", "optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),  # Adam: 1 - 1**t = 0
    ("scst.sample_n=0", "scst.sample_n must be >= 1, got 0"),
    ("scst.max_length=0", "scst.max_length must be >= 1, got 0"),
    ("scst.temperature=0", "scst.temperature must be > 0, got 0.0"),
    ("scst.temperature=1e-40", "scst.temperature must be a finite number of at least 1e-30"),  # the sampler's bound
    ("scst.temperature=1e39", "(below it the log-probs overflow float32) and at most 3.40282e+38, float32's "
                              "largest, got 1e+39"),
    ("resume=", "resume is empty; give resume=auto or a checkpoint folder"),
    ("init_from=", "init_from is empty (an unset variable?); give a path, or leave init_from out (null) for its "
                   "default"),
    ("kd.teacher=", "kd.teacher is empty (an unset variable?)"),
    ("data.features=", "data.features is empty (an unset variable?)"),
    ("data.labels=", "data.labels is empty"), ("data.cider_df=", "data.cider_df is empty"),
    ("eval.references=", "eval.references is empty"), ("data.dir=", "data.dir is empty (an unset variable?)"),
    ("scst.bleu_weight=-1", "scst.bleu_weight must be >= 0, got -1.0"),
    ("scst.cider_weight=0", "scst.cider_weight and scst.bleu_weight are both 0"),
    ("scst.cider_weight=1e308", "scst.cider_weight and scst.bleu_weight must be at most 1e+30 (the rewards they "
                                "scale overflow float32 in the loss), got 1e+308 and 0"),  # a NaN loss at once
    ("scst.bleu_weight=1e31", "must be at most 1e+30 (the rewards they scale overflow float32 in the loss), got 1 "
                              "and 1e+31"),
    ("kd.weight=-0.5", "kd.weight must be >= 0, got -0.5"),
    ("kd.weight=1e308", "kd.weight must be at most 1e+30 (the KL term it scales overflows float32 in the loss), "
                        "got 1e+308"),  # an infinite loss at once
])
def test_train_config_refuses_values_that_would_fail_mid_run(tmp_path, override, message):
    """Values that would otherwise stop a run part-way (at its first validation, its first log record,
    inside torch) are refused when the config is read, naming the option, before the run folder exists."""
    from satic.cli import main as satic_main
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text(f"out_dir: {tmp_path / 'run'}\nmax_iters: 5\n")
    with pytest.raises(SaticError) as info:
        load_config(TrainConfig, path, [override])
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "sample_method" not in str(info.value)  # not an option of train
    assert satic_main(["train", str(path), override]) == 2
    assert not (tmp_path / "run").exists()


def test_train_config_defaults_and_shipped_configs_pass_the_checks():
    from satic.config import configs_dir
    from satic.training.config import TrainConfig

    assert TrainConfig(max_iters=1).eval.max_images == -1
    shipped = [p for p in sorted(configs_dir().glob("*/*.yaml")) if p.name != "demo.yaml"]
    assert len(shipped) == 12
    for path in shipped:
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=true", "override 'optim.lr=true': expected a number, got True"),
    ("seed=true", "override 'seed=true': expected an integer, got True"),
    ("out_dir=true", "override 'out_dir=true': expected a string, got True (YAML reads yes, no, on, off, true and "
                     "false as booleans: quote the text, e.g. 'no')"),
    ("progress=1", "override 'progress=1': expected true or false, got 1"),
    ("out_dir=[a,b]", "override 'out_dir=[a,b]': expected a string, got ['a', 'b']"),
    ("eval.references={a: 1}", "override 'eval.references={a: 1}': expected a string, got {'a': 1}"),
    ("optim.betas=0.9", "override 'optim.betas=0.9': expected a list, got 0.9"),
    ("model=5", "override 'model=5': expected a mapping, got 5"),
    ("optim.lr=nan", "override 'optim.lr=nan': expected a finite number, got 'nan'"),
    ("seed=010", "override 'seed=010': YAML reads 010 as an octal number, 8; write the number meant without its "
                 "leading 0"),
    ("optim.lr=1:30", "override 'optim.lr=1:30': YAML reads 1:30 as a base-60 number, 90; write the number meant "
                      "without colons"),
    ("optim.lr=.inf", "override 'optim.lr=.inf': expected a finite number, got inf"),
    ("optim.lr=1e400", "override 'optim.lr=1e400': expected a finite number, got '1e400'"),
    ("optim.lr=1" + "0" * 400, "override 'optim.lr=1" + "0" * 400 + "': expected a finite number, got an integer "
                               "beyond any float"),
    ("optim.betas=[0.9,.nan]", "override 'optim.betas=[0.9,.nan]'[1]: expected a finite number, got nan"),
    ("model.dropout=.nan", "override 'model.dropout=.nan': expected a finite number, got nan"),
    ("=5", "override '=5' is not of the form key=value"),
    ("eval.split=bogus", "override 'eval.split=bogus': 'bogus' is not one of ['train', 'val', 'test']"),
    ("max_iters.x=1", "override 'max_iters.x=1': max_iters is not a section"),
    ("model.d_model.x=1", "override 'model.d_model.x=1': model.d_model is a value, not a section"),
    ("data.builtin.imgs=5", "override 'data.builtin.imgs=5': unknown key(s) ['imgs'] in section data.builtin; valid "
                            "keys are ['feature_dim', 'images', 'seed']"),
])
def test_a_value_of_the_wrong_kind_is_refused_not_converted(tmp_path, override, message):
    """true is no number, 1 no boolean, a number no list: each is named as the override it came in."""
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 5\n")
    with pytest.raises(SaticError) as info:
        load_config(TrainConfig, path, [override])
    assert str(info.value) == message


def test_an_override_yaml_cannot_read_is_named(tmp_path):
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 5\n")
    with pytest.raises(SaticError, match=r"^override 'optim.betas=\[0.9, 0.98': cannot parse value \(") as info:
        load_config(TrainConfig, path, ["optim.betas=[0.9, 0.98"])
    assert "expected ',' or ']'" in str(info.value)


def test_a_boolean_given_for_a_string_says_how_to_quote_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out_dir: no\n")
    with pytest.raises(SaticError, match=rf"^{path}.out_dir: expected a string, got False \(YAML reads yes, no, on, "
                                         r"off, true and false as booleans: quote the text, e.g. 'no'\)$"):
        load_config(Run, path)
    path.write_text("out_dir: 'no'\n")
    assert load_config(Run, path).out_dir == "no"


def test_a_number_given_for_a_string_is_kept_as_text(tmp_path):
    assert load_config(Run, None, ["out_dir=2024"]).out_dir == "2024"
    path = tmp_path / "run.yaml"
    for written in ("010", "0x1F", "1_000", "12:30", "1.50", ".5", "2024-05-01"):  # not YAML 1.1's 8, 31, 750, ...
        assert load_config(Run, None, [f"out_dir={written}"]).out_dir == written
        path.write_text(f"out_dir: {written}\n")
        assert load_config(Run, path).out_dir == written
    path.write_text("seed: 0x10\nlayers: [1_0]\noptim:\n  lr: 1_0\n  schedule: step\n")  # numbers stay numbers
    config = load_config(Run, path)
    assert config == Run(seed=16, layers=(10,), optim=Optim(lr=10.0, schedule="step"))
    assert yaml.safe_load(yaml.safe_dump(to_dict(config))) == to_dict(config)
    path.write_text("seed: 07\n")  # 7 however it is read
    assert load_config(Run, path).seed == 7
    path.write_text("seed: 010\n")
    with pytest.raises(SaticError, match=rf"^{path}.seed: YAML reads 010 as an octal number, 8; write the number "):
        load_config(Run, path)


def test_a_config_file_is_checked_as_overrides_are(tmp_path):
    """Unknown keys in the file itself, an empty file (all defaults), a file that is not a mapping, a section
    given as an object rather than a mapping, a class with a field that has no default."""
    from satic.model.config import ModelConfig

    path = tmp_path / "run.yaml"
    path.write_text("sed: 1\n")
    with pytest.raises(SaticError) as info:
        load_config(Run, path)
    assert str(info.value) == (f"{path}: unknown key(s) ['sed']; valid keys are "
                               "['layers', 'optim', 'out_dir', 'resume', 'seed']")
    path.write_text("seed: 1\nyes: 2\nsed: 3\n")  # YAML 1.1 reads the key yes as true
    with pytest.raises(SaticError) as info:
        load_config(Run, path)
    assert str(info.value).startswith(f"{path}: unknown key(s) [True, 'sed']; valid keys are")
    path.write_text("optim:\n  2: 1\n  rate: 3\n")
    with pytest.raises(SaticError, match=rf"^{path}.optim: unknown key\(s\) \[2, 'rate'\]; valid keys are"):
        load_config(Run, path)
    path.write_text("")
    assert load_config(Run, path) == Run()
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SaticError, match=f"^config file {path} must hold a mapping of keys to values$"):
        load_config(Run, path)
    assert from_dict(Outer, {"optim": Optim(lr=2.0)}).optim == Optim(lr=2.0)
    with pytest.raises(SaticError, match=r"^net: .*vocab_size"):
        from_dict(ModelConfig, {"d_model": 8, "num_heads": 2}, "net")


@pytest.mark.parametrize("overrides, message", [
    (["optim.label_smoothing=1"], "optim.label_smoothing must be in [0, 1)"),
    (["optim.plateau_patience=-1"], "optim.plateau_patience must be >= 0, got -1"),
    (["optim.noam_factor=0"], "optim.noam_factor and optim.decay_rate must be > 0"),
    (["scst.after_epoch=0", "scst.sample_n=1"], "scst.baseline 'new' needs scst.sample_n >= 2"),
    (["scst.after_epoch=-2"], "scst.after_epoch must be >= -1, got -2"),
    (["eval.max_images=-2"], "eval.max_images must be -1 (the whole split) or >= 1, got -2"),
    (["eval.length_penalty=wu"], "eval.length_penalty must be '', 'wu_A' or 'avg_A' with |A| <= 50 (e.g. wu_0.9), "
                                 "got 'wu'"),
    (["max_iters=-1"], "set max_iters or max_epochs (both are -1, the run would never end)"),
    (["out_dir=' '"], "out_dir is empty"),
    (["init_continue=true"], "init_continue=true needs init_from"),
    (["kd.weight=0.5"], "kd.weight > 0 needs kd.teacher"),
    (["model.d_model=100", "model.num_heads=3"], "d_model (100) must be divisible by num_heads (3)"),
])
def test_train_config_refuses_values_at_the_edge_of_their_range(tmp_path, overrides, message):
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 5\n")
    with pytest.raises(SaticError) as info:
        load_config(TrainConfig, path, overrides)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["optim.schedule=step", "optim.noam_warmup=0"],  # the warm-up is Noam's alone
    ["optim.betas=[0, 0.5]"],
    ["scst.cider_weight=0", "scst.bleu_weight=1"],  # a BLEU-only reward
    ["scst.sample_n=1", "scst.baseline=greedy", "scst.after_epoch=0"],
    ["scst.sample_n=2", "scst.after_epoch=0"],  # each sample's baseline is the other one's reward
    ["eval.max_images=1"],
])
def test_train_config_accepts_values_at_the_edge_of_their_range(overrides):
    from satic.training.config import TrainConfig

    load_config(TrainConfig, None, ["max_iters=5", *overrides])


@pytest.mark.parametrize("schedule, betas, eps", [("noam", (0.9, 0.98), 1e-9), ("step", (0.9, 0.999), 1e-8),
                                                   ("plateau", (0.9, 0.999), 1e-8), ("constant", (0.9, 0.999), 1e-8)])
def test_adam_defaults_to_the_references_settings_for_each_schedule(schedule, betas, eps):
    """Unset, Adam's betas and eps are the reference's: its NoamOpt's with the Noam schedule, its optim_alpha,
    optim_beta and optim_epsilon with the others; given, they are kept."""
    from satic.training.config import OptimConfig

    optim = OptimConfig(schedule=schedule)
    assert (optim.betas, optim.eps) == (betas, eps)
    assert (OptimConfig(schedule=schedule, betas=(0.5, 0.6), eps=1e-3).betas, OptimConfig(eps=1e-3).eps) == \
        ((0.5, 0.6), 1e-3)


def test_a_data_size_in_the_model_section_is_named_before_an_unknown_key(tmp_path):
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 5\nmodel:\n  num_layer: 2\n  vocab_size: 9\n")
    with pytest.raises(SaticError, match=f"^{path}: model.vocab_size comes from the data"):
        load_config(TrainConfig, path)


def test_describe_difference_names_each_changed_key_by_its_dotted_path():
    from satic.training.config import describe_difference

    old = {"seed": 0, "optim": {"lr": 1.0, "eps": 2.0}, "data": {"builtin": {"images": 10}}}
    new = {"seed": 0, "optim": {"lr": 2.0, "eps": 2.0}, "data": {"builtin": {"images": 20}}, "kd": 1}
    assert describe_difference(old, new) == ["data.builtin.images: 10 -> 20", "kd: None -> 1", "optim.lr: 1.0 -> 2.0"]
    assert describe_difference(new, new) == []


def test_describe_difference_names_a_section_given_on_one_side_only_as_a_whole():
    from satic.training.config import describe_difference

    unset, given = {"data": {"builtin": None}}, {"data": {"builtin": {"images": 5}}}
    assert describe_difference(unset, given) == ["data.builtin: None -> {'images': 5}"]
    assert describe_difference(given, unset) == ["data.builtin: {'images': 5} -> None"]


def test_the_largest_seed_numpy_takes_is_accepted():
    from satic.training.config import TrainConfig

    assert TrainConfig(max_iters=1, seed=2**32 - 1).seed == 4294967295


def test_train_config_defaults_follow_the_reference_and_satic_synth():
    """The reference's training: 5 captions per image, gradients clipped by value, the KD teacher's dropout on;
    data.builtin: {} makes the dataset `satic synth DIR` makes."""
    import inspect

    from satic.data.synth import make_synthetic
    from satic.training.config import BuiltinData, DataConfig, KdConfig, OptimConfig

    assert DataConfig().seq_per_img == 5
    assert OptimConfig().grad_clip_mode == "value" and KdConfig().teacher_dropout is True
    synth = inspect.signature(make_synthetic).parameters
    assert BuiltinData() == BuiltinData(**{name: synth[name].default for name in ("images", "seed", "feature_dim")})


def test_the_eval_section_gives_validation_each_of_its_decoding_options():
    from satic.decoding.options import DecodeOptions
    from satic.training.config import EvalConfig

    options = dict(beam_size=3, max_length=9, length_penalty="avg_1", block_trigrams=True, remove_bad_endings=True)
    assert EvalConfig(**options).decode_options() == DecodeOptions(**options)


def test_a_section_whose_lines_are_all_commented_out_takes_its_defaults(tmp_path):
    """`optim:` followed only by comments is YAML null: the section's defaults, as if it were left out."""
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\noptim:\n  # lr: 2\n")
    assert load_config(Run, path) == Run(seed=3)
    from satic.training.config import TrainConfig

    path.write_text("max_iters: 3\nmodel:\n  # d_model: 8\n")  # a mapping section, too
    assert load_config(TrainConfig, path) == load_config(TrainConfig, None, ["max_iters=3"])
    path.write_text("seed: 3\noptim: 2\n")
    with pytest.raises(SaticError, match=r"optim: expected a mapping of Optim fields, got 2"):
        load_config(Run, path)


def test_the_recorded_model_section_holds_every_value_the_run_uses():
    """config.json (to_dict) is the run's whole config: a model key left out is recorded with the default it
    took, so the run can be repeated from it even if a default changes; the data's two sizes stay out."""
    from satic.model.config import ModelConfig
    from satic.training.config import TrainConfig

    model = to_dict(load_config(TrainConfig, None, ["max_iters=1", "model.group_size=2"]))["model"]
    assert model == {"group_size": 2, "num_layers": 6, "d_model": 512, "d_ff": 2048, "num_heads": 8,
                     "dropout": 0.1, "att_dropout": 0.5, "max_positions": 5000}
    written = load_config(TrainConfig, None, ["max_iters=1", "model.group_size=0x2", "model.dropout=1e-1"]).model
    assert yaml.safe_dump(written) == yaml.safe_dump(model)  # as the model takes them: 2, and 0.1, not '1e-1'
    assert ModelConfig(vocab_size=3, att_feat_size=4, **model) == ModelConfig(vocab_size=3, att_feat_size=4,
                                                                              group_size=2)


def laughs(levels: int) -> str:
    """A "billion laughs" mapping: each alias stands for ten of the one before, 10**levels values in all."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "{" + ", ".join(lines) + "}"


def test_aliases_that_expand_beyond_any_config_are_refused_before_they_are_built(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"layers: {laughs(6)}\nout_dir: *a5\n")
    message = "its aliases (*name) expand to more than 100,000 values; write the values out, or refer to fewer"
    with pytest.raises(SaticError) as info:
        load_config(Run, bomb)
    assert str(info.value) == f"config file {bomb}: {message}"
    bomb.write_text("out_dir: &a [*a]\n")  # an alias inside its own anchor
    with pytest.raises(SaticError, match="its aliases"):
        load_config(Run, bomb)
    with pytest.raises(SaticError) as info:
        load_config(Run, None, [f"optim={laughs(6)}"])
    assert str(info.value) == f"override 'optim={laughs(6)}': cannot parse value ({message})"
    fine = tmp_path / "fine.yaml"
    fine.write_text("optim: &o {lr: 0.5}\nlayers: &l [3, 4]\n")
    assert load_config(Run, fine).layers == (3, 4)


def test_lists_nested_deeper_than_python_can_read_are_named(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"layers: {'[' * 5000}{']' * 5000}\n")
    message = "its lists or mappings nest too deeply for Python to read; no config nests more than a few levels"
    with pytest.raises(SaticError) as info:
        load_config(Run, deep)
    assert str(info.value) == f"config file {deep}: {message}"
    with pytest.raises(SaticError, match=r"^override 'seed=\[\[\[.*\]': cannot parse value \(its lists or mappings"):
        load_config(Run, None, [f"seed={'[' * 5000}{']' * 5000}"])


@pytest.mark.parametrize("section", ["optim", "data", "model", "kd"])
def test_null_for_a_section_is_refused_rather_than_resetting_the_files_keys(tmp_path, section):
    from satic.training.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 5\noptim: {noam_warmup: 300}\ndata: {batch_size: 16}\nmodel: {d_model: 32}\n")
    with pytest.raises(SaticError) as info:
        load_config(TrainConfig, path, [f"{section}=null"])
    assert str(info.value) == (f"override '{section}=null': {section} is a section, which null would reset to its "
                               f"defaults, dropping what the config file sets there; set its keys one by one "
                               f"({section}.KEY=VALUE)")
    config = load_config(TrainConfig, path, ["data.builtin=null", f"{section}={{}}"])  # an optional one may be off
    assert (config.optim.noam_warmup, config.data.batch_size, config.model["d_model"]) == (300, 16, 32)
