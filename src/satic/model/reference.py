"""Import checkpoints saved by the reference code (YuanEZhou/satic): model-best.pth + infos_<id>-best.pkl.

The .pth is a plain state_dict (loaded with weights_only=True); the infos pickle holds an
argparse.Namespace of options and the vocabulary, read with an unpickler that builds nothing but
plain values. Parameter names are mapped onto SATModel's fused projections.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from satic.config import from_dict
from satic.data.stores import BOX_GEOMETRY
from satic.data.vocab import Vocabulary
from satic.decoding.options import DecodeOptions
from satic.errors import SaticError, first_few, library_reason
from satic.io import UnsafePickleError, read_restricted_pickle, require_file, torch_load
from satic.model.config import ModelConfig
from satic.model.transformer import SATModel, all_finite, sinusoid_table

REFERENCE_HEADS = 8  # fixed in the reference code
REFERENCE_DROPOUT = 0.1  # make_model's default, used for every Transformer dropout
SUPPORTED_MODELS = ("sat", "transformer")
# Options that change how features are prepared or how captions are decoded, handed to the caller.
PASSED_OPTIONS = ("max_length", "seq_length", "norm_att_feat", "use_box", "beam_size", "id",
                  "caption_model", "input_json", "input_att_dir", "input_fc_dir", "input_box_dir",
                  "length_penalty", "remove_bad_endings")


def load_reference_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The reference's model-best.pth as a dict of tensors (weights_only: no code is run)."""
    path = require_file(path, "reference model file")
    try:
        state = torch_load(path)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise SaticError(f"{path} is not a readable weights-only torch checkpoint ({library_reason(err)}); pass "
                         "the reference's model-best.pth") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise SaticError(f"{path} does not hold a state_dict (a mapping of names to tensors); "
                         "pass the reference's model-best.pth, not a whole-model or optimizer file")
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> Any:
    import numpy as np

    dtype = np.dtype(name)
    if dtype.kind not in "biuf":
        raise UnsafePickleError(f"numpy dtype {name!r} is not a plain number type")
    return dtype


def _numpy_scalar(dtype: Any, data: bytes) -> Any:
    """A pickled numpy number (e.g. a CIDEr score) -> the plain Python number."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise UnsafePickleError("only numeric numpy scalars are accepted")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """Protocol-2 pickles spell bytes as _codecs.encode(text, 'latin1'); nothing else is allowed."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("only latin1-encoded byte strings are accepted")
    return text.encode("latin1")


_INFOS_ALLOWED = {  # plain values, argparse.Namespace and numeric numpy scalars
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


def read_reference_infos(path: str | Path) -> dict:
    """The reference's infos_<id>-best.pkl as a dict, read without running any code from it."""
    infos = read_restricted_pickle(path, _INFOS_ALLOWED, "infos pickle", "options, vocabulary and plain values "
                                   "(argparse.Namespace, dict, list, str, numbers)",
                                   "pass the reference's infos_<id>-best.pkl")
    if not isinstance(infos, dict) or not isinstance(infos.get("opt"), argparse.Namespace):
        raise SaticError(f"{path} has no 'opt' options Namespace; pass the reference's infos_<id>-best.pkl")
    if not isinstance(infos.get("vocab"), dict):
        raise SaticError(f"{path} has no 'vocab' mapping; pass the reference's infos_<id>-best.pkl")
    return infos


def _rename(name: str) -> str | None:
    """Reference parameter name -> ours; linears 0-2 of attention map onto fused names with a slot suffix."""
    rules = [
        (r"att_embed\.0\.(weight|bias)", r"region_embed.\1"),
        (r"model\.encoder\.layers\.(\d+)\.self_attn\.linears\.([012])\.(weight|bias)",
         r"encoder_layers.\1.attn.qkv.\3#\2"),
        (r"model\.encoder\.layers\.(\d+)\.self_attn\.linears\.3\.(weight|bias)", r"encoder_layers.\1.attn.out.\2"),
        (r"model\.encoder\.layers\.(\d+)\.feed_forward\.w_([12])\.(weight|bias)", r"encoder_layers.\1.ffn.w\2.\3"),
        (r"model\.encoder\.layers\.(\d+)\.sublayer\.([01])\.norm\.(a_2|b_2)", r"encoder_layers.\1.norm<\2>.\3"),
        (r"model\.encoder\.norm\.(a_2|b_2)", r"encoder_norm.\1"),
        (r"model\.decoder\.layers\.(\d+)\.self_attn\.linears\.([012])\.(weight|bias)",
         r"decoder_layers.\1.self_attn.qkv.\3#\2"),
        (r"model\.decoder\.layers\.(\d+)\.self_attn\.linears\.3\.(weight|bias)", r"decoder_layers.\1.self_attn.out.\2"),
        (r"model\.decoder\.layers\.(\d+)\.src_attn\.linears\.0\.(weight|bias)", r"decoder_layers.\1.cross_attn.q.\2"),
        (r"model\.decoder\.layers\.(\d+)\.src_attn\.linears\.([12])\.(weight|bias)",
         r"decoder_layers.\1.cross_attn.kv.\3#\2"),
        (r"model\.decoder\.layers\.(\d+)\.src_attn\.linears\.3\.(weight|bias)", r"decoder_layers.\1.cross_attn.out.\2"),
        (r"model\.decoder\.layers\.(\d+)\.feed_forward\.w_([12])\.(weight|bias)", r"decoder_layers.\1.ffn.w\2.\3"),
        (r"model\.decoder\.layers\.(\d+)\.sublayer\.([012])\.norm\.(a_2|b_2)", r"decoder_layers.\1.norm<\2>.\3"),
        (r"model\.decoder\.norm\.(a_2|b_2)", r"decoder_norm.\1"),
        (r"model\.tgt_embed\.0\.lut\.weight", "word_embed.weight"),
        (r"model\.generator\.proj\.(weight|bias)", r"generator.\1"),
    ]
    for pattern, target in rules:
        match = re.fullmatch(pattern, name)
        if match:
            out = match.expand(target)
            out = re.sub(r"norm<(\d)>", lambda m: f"norm{int(m.group(1)) + 1}", out)
            return out.replace(".a_2", ".weight").replace(".b_2", ".bias")
    return None


def _fused_slots(base: str) -> list[int]:
    """The reference's linears a fused projection stacks on its output dimension: q;k;v (linears 0-2), or
    k;v (linears 1-2) for cross-attention's `kv`."""
    return [1, 2] if ".kv." in base else [0, 1, 2]


def _convert(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename the reference's parameters and concatenate the fused projections (q;k;v and k;v)."""
    parts: dict[str, dict[int, Tensor]] = {}
    out: dict[str, Tensor] = {}
    unexpected = []
    for name, tensor in state.items():
        if name == "model.tgt_embed.1.pe":
            continue
        target = _rename(name)
        if target is None:
            unexpected.append(name)
        elif "#" in target:
            base, slot = target.split("#")
            parts.setdefault(base, {})[int(slot)] = tensor
        else:
            out[target] = tensor
    if unexpected:
        raise SaticError(f"{source}: unexpected parameter(s) {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}; "
                         "only the reference's SAT/Transformer model (use_bn=0) can be imported")
    for base, slots in parts.items():
        wanted = _fused_slots(base)
        if sorted(slots) != wanted:
            missing = [s for s in wanted if s not in slots]
            raise SaticError(f"{source}: missing attention projection(s) {missing} for {base}")
        shapes = [tuple(slots[s].shape) for s in wanted]
        if len(set(shapes)) > 1:
            raise SaticError(f"{source}: the attention projections fused into {base} have shapes {shapes}, which "
                             "differ; the file is damaged or not the reference's model-best.pth")
        out[base] = torch.cat([slots[s] for s in wanted], 0)
    return out


def _whole_option(opt: argparse.Namespace, name: str, default: int, source: str, flag: bool = False) -> int:
    """opt.<name> as the int the reference's opts.py parses it into (absent or None: `default`; a flag may also be
    a bool). Anything else (a string, a float, NaN, a list) is a damaged or hand-edited infos file, refused by name
    rather than read as some other number or as true."""
    value = getattr(opt, name, None)
    if value is None:
        return default
    if isinstance(value, numbers.Integral) and (flag or not isinstance(value, bool)):
        return int(value)
    raise SaticError(f"{source}: opt.{name} is {value!r}, not a whole number; the infos file is damaged or not from "
                     "the reference's train.py")


def _config_from(state: dict[str, Tensor], opt: argparse.Namespace, vocab: Vocabulary, source: str,
                 infos_source: str) -> ModelConfig:
    def shape(name: str, dims: tuple[int, ...] = (2,)) -> tuple[int, ...]:
        if name not in state:
            raise SaticError(f"{source}: missing parameter {name}; is this a reference SAT checkpoint?")
        if state[name].dim() not in dims:
            raise SaticError(f"{source}: parameter {name} has shape {tuple(state[name].shape)}, not "
                             f"{' or '.join(map(str, dims))} dimensions; the file is damaged or not the reference's "
                             "model-best.pth")
        return tuple(state[name].shape)

    layers = {int(m.group(1)) for k in state for m in [re.match(r"model\.encoder\.layers\.(\d+)\.", k)] if m}
    num_outputs, d_model = shape("model.tgt_embed.0.lut.weight")
    if num_outputs != len(vocab) + 1:
        raise SaticError(f"{source}: the model has {num_outputs} outputs but the infos vocabulary has "
                         f"{len(vocab)} words (+1 for EOS); the two files come from different runs")
    pe = shape("model.tgt_embed.1.pe", dims=(2, 3))  # (1, positions, d) as saved, or (positions, d)
    if pe[-1] != d_model or pe[:-2] not in ((), (1,)):
        raise SaticError(f"{source}: model.tgt_embed.1.pe has shape {pe}, not (1, positions, {d_model}); the file "
                         "is damaged or not the reference's model-best.pth")
    # self-critical.pytorch's TransformerModel never reads opt.K (one word per step), and the reference's opts.py
    # gives every run K=6 unless --K is passed, so a teacher's infos can hold any K
    k = 1 if getattr(opt, "caption_model", "sat") == "transformer" else getattr(opt, "K", None)
    k = 1 if k is None else k
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise SaticError(f"{infos_source}: opt.K is {k!r}, not a whole number >= 1 (the words decoded per step); the "
                         "infos file is damaged or not from the reference's train.py")
    return ModelConfig(
        vocab_size=len(vocab),
        group_size=int(k),
        num_layers=len(layers),
        d_model=d_model,
        d_ff=shape("model.encoder.layers.0.feed_forward.w_1.weight")[0],
        num_heads=REFERENCE_HEADS,
        dropout=REFERENCE_DROPOUT,
        att_feat_size=shape("att_embed.0.weight")[1],
        att_dropout=_dropout(opt, infos_source),
        max_positions=pe[-2],
    )


def _dropout(opt: argparse.Namespace, source: str) -> float:
    """opt.drop_prob_lm (absent: the reference's default 0.5), a real number; ModelConfig checks its range."""
    value = getattr(opt, "drop_prob_lm", 0.5)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SaticError(f"{source}: opt.drop_prob_lm is {value!r}, not a number; the infos file is damaged or not "
                         "from the reference's train.py")
    return float(value)


def model_from_reference(state: dict[str, Tensor], infos: dict, source: str = "reference checkpoint",
                         infos_source: str | None = None) -> tuple[SATModel, Vocabulary, dict]:
    """(state_dict, infos) -> (SATModel in eval mode, Vocabulary, options that matter downstream). `source` names
    the weights in messages, `infos_source` the infos file (default: `source`)."""
    opt = infos["opt"]
    infos_source = str(infos_source or source)
    caption_model = getattr(opt, "caption_model", "sat")
    if caption_model not in SUPPORTED_MODELS:
        raise SaticError(f"{infos_source}: caption_model={caption_model!r} is not supported; only "
                         f"{list(SUPPORTED_MODELS)}")
    flags = {name: _whole_option(opt, name, 0, infos_source, flag=True)
             for name in ("use_bn", "use_box", "norm_box_feat", "norm_att_feat", "remove_bad_endings")}
    if flags["use_bn"]:
        raise SaticError(f"{infos_source}: use_bn={opt.use_bn} (batch-norm region embedding) is not supported")
    if flags["use_box"] and flags["norm_box_feat"]:
        raise SaticError(f"{infos_source}: norm_box_feat={opt.norm_box_feat} (the reference's loader divides each "
                         "box's 5 numbers by their norm) is not supported: satic would feed this model other box "
                         "numbers")
    for name, tensor in state.items():
        if tensor.layout != torch.strided or not tensor.is_floating_point():
            kind = "" if tensor.layout == torch.strided else f"{str(tensor.layout).replace('torch.', '')} "
            raise SaticError(f"{source}: parameter {name} is a {kind}{tensor.dtype} tensor; the reference's weights "
                             "are dense floating-point tensors (the file is damaged or not its model-best.pth)")
    vocab = Vocabulary.from_ix_to_word(infos["vocab"], source=f"{infos_source} vocabulary")
    try:
        config = _config_from(state, opt, vocab, source, infos_source)
    except ValueError as err:
        raise SaticError(f"{source}: unsupported model shape ({err})") from err
    # the reference's train.py adds the 5 box numbers to opt.att_feat_size (with use_box) before it saves the infos,
    # and its eval.py builds the region embedding from that number as it is
    expected_feat = _whole_option(opt, "att_feat_size", config.att_feat_size, infos_source)
    if expected_feat != config.att_feat_size:
        raise SaticError(f"{source}: the region embedding takes {config.att_feat_size} inputs but the options say "
                         f"att_feat_size={opt.att_feat_size} (with use_box={getattr(opt, 'use_box', 0)}, the reference "
                         "counts the 5 box numbers in it); the files do not match")
    if getattr(opt, "use_box", 0) and config.att_feat_size <= BOX_GEOMETRY:
        raise SaticError(f"{source}: use_box={opt.use_box} but the region embedding takes only {config.att_feat_size} "
                         f"inputs, no more than the {BOX_GEOMETRY} box numbers; the files do not match")
    pe = state.get("model.tgt_embed.1.pe")
    if pe is not None:
        table = pe.reshape(-1, config.d_model).float()
        # 1e-3: CPUs' float32 exp differs by an ulp, which moves the angle at position 5000 by ~3e-4
        if not torch.allclose(table, sinusoid_table(table.size(0), config.d_model), atol=1e-3):
            raise SaticError(f"{source}: model.tgt_embed.1.pe is not the standard sinusoidal table")
    model = SATModel(config)
    ours = _convert(state, source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise SaticError(f"{source}: missing parameter(s) for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    surplus = sorted(set(ours) - set(expected))
    if surplus:  # e.g. a decoder layer beyond the encoder's count, which sets the model's depth
        raise SaticError(f"{source}: parameter(s) for {first_few(surplus)} do not fit a model of "
                         f"{config.num_layers} encoder and decoder layers; the file is damaged or not the reference's "
                         "model-best.pth")
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SaticError(f"{source}: parameter {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[name].shape)} for {config}")
        if not all_finite(tensor):
            raise SaticError(f"{source}: parameter {name} contains NaN or infinite values")
    model.load_state_dict(ours)
    options = {name: getattr(opt, name) for name in PASSED_OPTIONS if hasattr(opt, name)}
    options.update({name: flags[name] for name in ("use_box", "norm_att_feat", "remove_bad_endings")
                    if name in options})  # as checked: 0 or 1, not the file's "0" or NaN
    # the reference's eval.py decodes max_length words, its opts.py's 20 unless set; seq_length (the label
    # files' length, which train.py records) stands in for an infos file without it
    length_option = "max_length" if getattr(opt, "max_length", None) else "seq_length"
    max_length = _whole_option(opt, length_option, 0, infos_source) if getattr(opt, length_option, None) else 20
    if max_length < config.group_size:
        raise SaticError(f"{infos_source}: opt.{length_option} is {max_length}, shorter than one group of "
                         f"K={config.group_size} words; the infos file is damaged or not from the reference's "
                         "train.py")
    options["decode_max_length"] = max_length
    length_penalty = options.get("length_penalty") or ""
    try:
        from_dict(DecodeOptions, {"length_penalty": length_penalty}, "decode options")
    except SaticError as err:
        raise SaticError(f"{infos_source}: opt.length_penalty is {length_penalty!r}, which satic cannot decode with "
                         f"({err}); the infos file is damaged or not from the reference's train.py") from None
    if math.ceil(options["decode_max_length"] / config.group_size) * config.group_size > config.max_positions:
        raise SaticError(f"{source}: max_length {options['decode_max_length']} does not fit {config.max_positions} "
                         "positions")
    return model.eval(), vocab, options


# ---------------------------------------------------------------- export: the inverse of the import

REFERENCE_POSITIONS = 5000  # rows of the reference's positional-encoding buffer (PositionalEncoding's max_len)
# The reference's standard data layout (its README and opts.py defaults); its eval.py refuses paths on its
# command line that differ from those the infos file holds, so the export writes the ones the user names.
REFERENCE_DATA_PATHS = {"input_json": "data/cocotalk.json", "input_label_h5": "data/cocotalk_label.h5",
                        "input_att_dir": "data/mscoco/cocobu_att", "input_fc_dir": "data/mscoco/cocobu_fc",
                        "input_box_dir": "data/mscoco/cocobu_box"}


def reference_parameter_names(config: ModelConfig) -> list[str]:
    """The reference SAT model's state_dict keys for `config`, in its module order."""
    def linears(prefix: str) -> list[str]:
        return [f"{prefix}.linears.{i}.{p}" for i in range(4) for p in ("weight", "bias")]

    def norms(prefix: str, count: int) -> list[str]:
        return [f"{prefix}.sublayer.{i}.norm.{p}" for i in range(count) for p in ("a_2", "b_2")]

    ffn = [f"feed_forward.w_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    names = ["att_embed.0.weight", "att_embed.0.bias"]
    for i in range(config.num_layers):
        layer = f"model.encoder.layers.{i}"
        names += linears(f"{layer}.self_attn") + [f"{layer}.{n}" for n in ffn] + norms(layer, 2)
    names += ["model.encoder.norm.a_2", "model.encoder.norm.b_2"]
    for i in range(config.num_layers):
        layer = f"model.decoder.layers.{i}"
        names += (linears(f"{layer}.self_attn") + linears(f"{layer}.src_attn") + [f"{layer}.{n}" for n in ffn]
                  + norms(layer, 3))
    return names + ["model.decoder.norm.a_2", "model.decoder.norm.b_2", "model.tgt_embed.0.lut.weight",
                    "model.tgt_embed.1.pe", "model.generator.proj.weight", "model.generator.proj.bias"]


def reference_state_dict(model: SATModel) -> dict[str, Tensor]:
    """SATModel -> the reference's state_dict: the import's renaming run backwards, fused projections split
    into the reference's separate linears, and the positional table the reference keeps as a buffer."""
    config = model.config
    if config.num_heads != REFERENCE_HEADS:
        raise SaticError(f"the reference code fixes 8 attention heads; this model has {config.num_heads}, so it has "
                         "no reference equivalent; train one with model.num_heads=8 (as configs/coco/*.yaml; the "
                         "demo's models have fewer) to export it")
    ours = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.state_dict().items()}
    out = {}
    for name in reference_parameter_names(config):
        if name == "model.tgt_embed.1.pe":
            out[name] = sinusoid_table(REFERENCE_POSITIONS, config.d_model).unsqueeze(0)
            continue
        target = _rename(name)
        base, _, slot = target.partition("#")
        tensor = ours[base]
        if slot:
            slots = _fused_slots(base)
            tensor = tensor.chunk(len(slots), 0)[slots.index(int(slot))]
        out[name] = tensor.clone()
    return out


def reference_infos(config: ModelConfig, vocab: Vocabulary, use_box: bool, norm_att_feat: bool, max_length: int,
                    run_id: str, data_paths: dict[str, str], iteration: int = 0, epoch: int = 0,
                    caption_model: str = "sat", decode: dict | None = None) -> dict:
    """The infos dict the reference's eval.py reads: its options Namespace (the model's shape, the feature
    preparation, the data paths and the decoding length) and the vocabulary. rnn_type is its opts.py default,
    which train.py --start_from checks along with caption_model, rnn_size and num_layers. caption_model
    'transformer' (K = 1 only) is the teacher's class, whose decoding has no 40-position limit (SAT's
    relaxed_subsequent_mask has). decode: the checkpoint's decoding defaults; its length_penalty and
    remove_bad_endings go into the options, which eval.py decodes with."""
    decode = decode or {}
    if caption_model not in SUPPORTED_MODELS or (caption_model == "transformer" and config.group_size != 1):
        raise SaticError(f"caption_model {caption_model!r} cannot hold a model of K={config.group_size}")
    opt = argparse.Namespace(
        caption_model=caption_model, rnn_type="lstm", K=config.group_size, id=run_id, checkpoint_path=f"save/{run_id}",
        start_from=None,
        vocab_size=len(vocab), input_encoding_size=config.d_model, rnn_size=config.d_ff,
        # with use_box the 5 box numbers are counted in att_feat_size, as train.py saves it
        num_layers=config.num_layers, att_feat_size=config.att_feat_size,
        fc_feat_size=2048,
        att_hid_size=512, logit_layers=1, use_bn=0, drop_prob_lm=config.att_dropout,
        norm_att_feat=int(norm_att_feat), use_box=int(use_box), norm_box_feat=0, use_fc=True, use_att=True,
        seq_length=max_length, max_length=max_length, seq_per_img=5, batch_size=10, train_only=0,
        beam_size=1, length_penalty=str(decode.get("length_penalty", "") or ""), block_trigrams=0,
        remove_bad_endings=int(bool(decode.get("remove_bad_endings", False))), language_eval=1,
        **data_paths)
    return {"opt": opt, "vocab": vocab.to_ix_to_word(), "iter": iteration, "epoch": epoch, "best_val_score": None}
