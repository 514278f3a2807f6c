"""Self-describing checkpoints: DIR/model.safetensors (weights) + DIR/config.json (everything else).

config.json holds the model config (every field, so a checkpoint never depends on today's
defaults), the vocabulary and the features the model was trained on, so a checkpoint alone is
enough to caption. Both files carry the same random `checkpoint_id`: weights and a config from two
different saves (files copied from two checkpoints, or a save interrupted between the two files)
are refused instead of silently mixed. config.json also holds the SHA-256 of model.safetensors (what
`sha256sum` prints), checked at every load: a weight changed by a damaged disk or copy is refused
instead of captioning with another number. Version 1 checkpoints, saved before the digest, load
without that check.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model

from satic.config import from_dict, to_dict
from satic.data.vocab import Vocabulary
from satic.errors import SaticError, first_few, library_reason
from satic.io import hash_file, make_output_dir, read_json, staged_outputs, utf8_name
from satic.model.config import ModelConfig
from satic.model.transformer import BUILD_ERRORS, SATModel, all_finite, build_model

FORMAT = "satic-checkpoint"
FORMAT_VERSION = 2  # 2: config.json holds weights_sha256
READABLE_VERSIONS = (1, FORMAT_VERSION)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class FeatureSpec:
    """Which region features the model reads; captioning must feed it the same kind."""

    kind: Literal["bottom-up", "grid"] = "bottom-up"  # precomputed detector regions, or a CNN grid
    norm_att_feat: bool = False  # L2-normalise each region vector before the model
    use_box: bool = False  # 5 box-geometry numbers appended to each region
    extractor: dict | None = None  # grid features: the extractor settings (data/extract.py)

    def __post_init__(self) -> None:
        if self.extractor is not None and not isinstance(self.extractor, dict):
            raise ValueError(f"extractor must be null or a mapping of the settings that extracted the features, "
                             f"got {self.extractor!r}; re-save the checkpoint")
        if self.kind == "grid" and self.extractor is None:
            raise ValueError("grid features need the extractor settings that produced them")


@dataclass
class Checkpoint:
    model: torch.nn.Module  # SATModel in eval mode
    vocab: Vocabulary
    config: Any  # ModelConfig
    features: FeatureSpec
    extra: dict = field(default_factory=dict)  # free-form: training step, scores, source


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    vocab: Vocabulary,
    features: FeatureSpec | None = None,
    extra: dict | None = None,
) -> Path:
    """Write weights then config.json (with the weights' SHA-256), each atomically; config.json last marks the save
    complete."""
    directory = Path(directory)
    config = model.config
    if config.vocab_size != len(vocab):
        raise SaticError(
            f"cannot save checkpoint {directory}: the model has {config.vocab_size} words but the "
            f"vocabulary has {len(vocab)}"
        )
    features = features or FeatureSpec()
    checkpoint_id = uuid.uuid4().hex
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "weights_sha256": None,  # once the weights are written
        "model": to_dict(config),
        "vocab": vocab.to_ix_to_word(),
        "features": dataclasses.asdict(features),
        "extra": extra or {},
    }
    try:
        json.dumps(document)  # before any file is touched
    except (TypeError, ValueError) as err:
        raise SaticError(f"cannot save checkpoint {directory}: extra must hold plain JSON values ({err})") from err
    make_output_dir(directory, "checkpoint directory")
    with staged_outputs() as stage:  # both or neither: a full disk never leaves new weights beside the old config
        weights = stage(directory / WEIGHTS_FILE)
        save_model(model, str(weights), metadata={"format": FORMAT, "checkpoint_id": checkpoint_id})
        document["weights_sha256"] = hash_file(weights, hashlib.sha256()).hexdigest()
        stage(directory / CONFIG_FILE).write_text(json.dumps(document, indent=1) + "\n")
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    """The checkpoint's config.json, validated for format and version (no weights read)."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix in (".pth", ".pt", ".pkl"):
        raise SaticError(f"{directory} is a PyTorch file, not a satic checkpoint folder; a reference-code "
                         "model-best.pth converts into one with `satic import-reference --model M --infos I --out DIR`")
    if directory.is_file():
        parent = f" ({directory.parent})" if directory.name in (CONFIG_FILE, WEIGHTS_FILE) else ""
        raise SaticError(f"{directory} is a file; give the checkpoint folder that holds {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE}{parent}")
    if not directory.is_dir():
        raise SaticError(f"checkpoint directory not found: {directory} (give the folder that holds "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    saved = [name for name in ("best", "last") if (directory / name / CONFIG_FILE).is_file()]
    if saved and not (directory / WEIGHTS_FILE).is_file():
        raise SaticError(f"{directory} is a training run folder; give one of its checkpoints: "
                         + " or ".join(str(directory / name) for name in saved))
    if not (directory / CONFIG_FILE).exists() and not (directory / WEIGHTS_FILE).exists():
        raise SaticError(f"{directory} is not a satic checkpoint: it has no {CONFIG_FILE} or {WEIGHTS_FILE}; give "
                         "a folder that `satic train` (best/ or last/ of a run) or `satic import-reference` wrote")
    document = read_json(directory / CONFIG_FILE, "checkpoint config")
    where = directory / CONFIG_FILE
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SaticError(f"{where} is not a satic checkpoint config (format should be {FORMAT!r}); "
                         "convert reference checkpoints with `satic import-reference`")
    version = document.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise SaticError(f"{where} has format_version {version!r}; this satic reads versions "
                         f"{' and '.join(map(str, READABLE_VERSIONS))}: upgrade satic or re-save the checkpoint")
    required = {"checkpoint_id", "model", "vocab", "features"} | ({"weights_sha256"} if version >= 2 else set())
    missing = sorted(required - set(document))
    if missing:
        raise SaticError(f"{where} lacks {missing}; the checkpoint is damaged, re-save it")
    digest = document.get("weights_sha256")
    if version >= 2 and not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        raise SaticError(f"{where}: weights_sha256 must be the 64 hexadecimal digits of a SHA-256, got {digest!r}; "
                         "the checkpoint is damaged, re-save it")
    return document


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from config.json and fill it from model.safetensors (eval mode)."""
    directory = Path(directory)
    document = read_checkpoint_config(directory)
    where = directory / CONFIG_FILE
    for key, what in (("model", "the model's fields"), ("vocab", 'word indices to words ({"1": "a", ...})'),
                      ("features", "the feature fields"), ("extra", "free-form values (or null)")):
        value = document.get(key)
        if not isinstance(value, dict) and not (key == "extra" and value is None):
            raise SaticError(f"{where}: {key} must be a mapping of {what}, got {_kind(value)}; the checkpoint is "
                             "damaged, re-save it (or re-export it with satic)")
    config = from_dict(ModelConfig, document["model"], f"{where}: model", complete=True)
    vocab = Vocabulary.from_ix_to_word(document["vocab"], f"{where}: vocab", "re-save the checkpoint")
    if config.vocab_size != len(vocab):
        raise SaticError(f"{where}: the model config has vocab_size {config.vocab_size} but the "
                         f"vocabulary has {len(vocab)} words; the checkpoint is inconsistent, re-save it")
    features = read_feature_spec(document["features"], where)
    extra = dict(document.get("extra") or {})
    if not isinstance(extra.get("decode", {}), dict):
        raise SaticError(f"{where}: extra.decode must be a mapping of decoding options, got "
                         f"{_kind(extra['decode'])}; fix it or re-save the checkpoint")
    path = directory / WEIGHTS_FILE
    shapes = _weight_shapes(path, document["checkpoint_id"], document.get("weights_sha256"))
    model = _build_model(config, shapes, path, where)
    model.to(map_location).eval()
    return Checkpoint(model, vocab, config, features, extra)


def _build_model(config: ModelConfig, shapes: dict[str, tuple[int, ...]], path: Path, where: Path) -> torch.nn.Module:
    """The model config.json describes, once its layout matches the stored weights. The layout is taken from a
    model without storage, so a size damaged in config.json is named before anything that size is allocated."""
    fix = "the checkpoint is damaged, re-save it"
    # each of the num_layers encoder and decoder layers stores tensors: a count the file cannot hold is named
    # before a model of that many layers is built
    problems = [f"model.num_layers {config.num_layers} needs more tensors than the {len(shapes)} stored"] \
        if 2 * config.num_layers > len(shapes) else []
    shell = None
    if not problems:
        try:
            with torch.device("meta"):
                shell = SATModel(config)
        except BUILD_ERRORS as err:
            raise SaticError(f"{where}: cannot build the model it describes ({library_reason(err)}); {fix}") from None
        problems = layout_differences(shell.state_dict(), shapes)
    if problems:
        raise SaticError(f"weights in {path} do not fit the model described by {where}: "
                         f"{first_few(problems, sep='; ')}")
    fix = "if a size in it is damaged, re-save the checkpoint"  # max_positions: the one size the weights do not show
    return build_model(config, str(where), fix, weights=_read_weights(path), shell=shell)


def read_feature_spec(features: dict, where: Path) -> FeatureSpec:
    """Every field is required: a default (bottom-up, no box, ...) would silently feed the model other features."""
    names = [f.name for f in dataclasses.fields(FeatureSpec)]
    missing = [name for name in names if name not in features]
    if missing:
        raise SaticError(f"{where}: features lacks {', '.join(missing)}; a checkpoint must say which features "
                         "its model reads, so nothing is assumed: re-save (or re-export / re-import) the "
                         "checkpoint with satic")
    return from_dict(FeatureSpec, features, f"{where}: features", complete=True)


def _kind(value: Any) -> str:
    """How a JSON value is named in messages: 'a list', 'a string', 'nothing'."""
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


def layout_differences(wanted: Mapping[str, torch.Tensor], given: Mapping[str, Any],
                       optional: Iterable[str] = ()) -> list[str]:
    """Why weights do not load into a model whose state_dict is `wanted`: `given` maps each stored name to its
    tensor, its shape, or anything else found there; names missing (except `optional` ones), unexpected, or
    of another shape."""
    def shape(value: Any) -> Any:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else value if isinstance(value, tuple) \
            else type(value).__name__

    optional = set(optional)
    problems = [f"{name} missing" for name in wanted if name not in given and name not in optional]
    problems += [f"{name} unexpected" for name in given if name not in wanted]
    problems += [f"{name} is {shape(given[name])}, expected {shape(tensor)}" for name, tensor in wanted.items()
                 if name in given and shape(given[name]) != shape(tensor)]
    return problems


def _weight_shapes(path: Path, checkpoint_id: str, digest: str | None) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in a checkpoint's weights, from the file's header, once the header shows that the
    weights belong to the checkpoint's config, the file's SHA-256 is `digest` (version 1 checkpoints: None, not
    checked) and the weights are floating-point numbers."""
    if not path.is_file():
        raise SaticError(f"checkpoint weights not found: {path}; the checkpoint is incomplete, re-save it")
    config_path = path.parent / CONFIG_FILE
    if utf8_name(str(path)) is None:  # a folder named in another encoding
        raise SaticError(f"cannot read {path}: safetensors opens only paths that are UTF-8 text, and this one is not "
                         "(a folder named in another encoding); rename the folder, or move the checkpoint to one with "
                         "a UTF-8 name")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    except SafetensorError as err:
        raise SaticError(f"{path} is not a readable safetensors file ({err}); re-save the checkpoint") from err
    if "checkpoint_id" not in metadata:
        raise SaticError(f"{path} carries no checkpoint id, so nothing ties it to {config_path}: it was not saved by "
                         "satic with that config; re-save the checkpoint with satic (satic.model.save_checkpoint)")
    if metadata.get("checkpoint_id") != checkpoint_id:
        raise SaticError(f"{path} and {config_path} come from different checkpoints (their checkpoint ids "
                         "differ); put the weights and config.json of one checkpoint together, or re-save it")
    if digest is not None and hash_file(path, hashlib.sha256()).hexdigest() != digest:
        raise SaticError(f"{path} is damaged: its SHA-256 is not the weights_sha256 {config_path} was saved with, so "
                         "some of its bytes changed after the save; copy the checkpoint again from where it came "
                         "from, or use another of the run's checkpoints")
    problems = [f"{name} is {dtype}, not floating point" for name, dtype in dtypes.items()
                if dtype not in FLOAT_DTYPES]
    if problems:
        raise SaticError(f"weights in {path} do not fit the model described by {config_path}: "
                         f"{first_few(problems, sep='; ')}")
    return shapes


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights as float32 tensors, once none holds NaN or infinity. Each is a copy: load_file's tensors are views
    of the file mapped into memory, which would make a model that changes, or a process killed by SIGBUS, when the
    file is written over in place (`cp` of another checkpoint onto it) while the model is in use."""
    try:
        weights = {name: tensor.to(torch.float32, copy=True) for name, tensor in load_file(str(path)).items()}
    except (SafetensorError, RuntimeError) as err:
        raise SaticError(f"cannot read the weights in {path} ({err}); re-save the checkpoint") from err
    damaged = [name for name, tensor in weights.items() if not all_finite(tensor)]
    if damaged:
        raise SaticError(f"weights in {path} hold NaN or Inf ({first_few(damaged)}); the checkpoint is damaged, "
                         "or its training diverged: use an earlier checkpoint")
    return weights


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names of the dtypes a weight may be stored in
