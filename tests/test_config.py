from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

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
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(SaticError, match="not valid YAML"):
        load_config(Run, bad)


def test_overrides_do_not_mutate_input():
    data = {"optim": {"lr": 1}}
    assert apply_overrides(data, ["optim.lr=2"]) == {"optim": {"lr": 2}}
    assert data == {"optim": {"lr": 1}}


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


def test_complete_configs_name_each_missing_key():
    assert from_dict(Optim, {"lr": 1.0}) == Optim(lr=1.0)  # defaults fill in by default
    with pytest.raises(SaticError, match=r"saved: missing key\(s\) \['schedule'\]"):
        from_dict(Optim, {"lr": 1.0}, "saved", complete=True)
