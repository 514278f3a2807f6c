"""The training loop: XE (+ token-level KD), self-critical, validation, checkpoints, exact resume, DDP.

One optimizer step ("iteration") takes `optim.accum_steps` global batches. A rank's loss is its
sum over counted words divided by the word count of all ranks, so 1 process and N processes
(each with its shard of every global batch) compute the gradient of the same mean. XE divides
by the count of all the step's batches, so accumulating 2 batches of B equals one batch of 2B;
SCST, whose count depends on the samples, averages the batches' means.
"""
from __future__ import annotations

import contextlib
import filecmp
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from satic.config import to_dict
from satic.data.vocab import Vocabulary
from satic.decoding.options import DecodeOptions, checkpoint_defaults
from satic.device import beyond_memory
from satic.errors import SaticError, counted, first_few
from satic.io import deferred_interrupts, write_json
from satic.model.checkpoint import FeatureSpec
from satic.progress import new_bar
from satic.training import data as run_data
from satic.training.config import (OptimConfig, TrainConfig, check_model_section, complete_model_section,
                                   describe_difference)
from satic.training.distributed import (World, all_sum, barrier, close_world, init_world, launch_number, lost_peer,
                                        rank_0_failed, shard_bounds)
from satic.training.losses import cross_entropy, self_critical, token_kl
from satic.training.monitor import CURVES_FILE, LOG_FILE, RunLog, plot_curves
from satic.training.schedule import ScheduleState, learning_rate, observe_validation
from satic.training.scst import advantages, caption_rewards
from satic.training.state import (
    STATE_FILE,
    Progress,
    check_adam_state,
    copy_files,
    find_checkpoint,
    load_state,
    read_progress,
    read_schedule,
    reading_state,
    rng_state,
    save_state,
    set_rng_state,
    write_run_checkpoint,
)
from satic.training.validation import (eval_mode, load_validation_references, selection_metric, validate,
                                      validation_image_ids)

# Keys that may change between a run and its resumption without breaking exactness of what was done.
RESUMABLE_CHANGES = {"resume", "max_iters", "max_epochs", "progress", "init_from", "out_dir", "overwrite",
                     "resume_redoes_validation"}


@dataclass
class TrainResult:
    out_dir: Path
    iterations: int
    epochs: int
    best_score: float | None
    best_metric: str  # the validation metric that picked best/
    last: Path | None  # None when the run stopped before its first save
    best: Path | None


@dataclass
class StepStats:
    loss: float
    reward: float | None
    images: int


def pick_device(name: str, world_local_rank: int = 0) -> torch.device:
    """The `device=` of a run; plain 'cuda' means this process's local GPU under torchrun."""
    from satic.device import resolve_device

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():  # without CUDA the error names the device as given
        name = f"cuda:{world_local_rank}"
    try:
        return resolve_device(name)
    except SaticError as err:
        raise SaticError(f"device={name}: {err}") from None


def set_threads(threads: int, world: World) -> None:
    """CPU threads per process: small matrices gain little from threads, and processes must not oversubscribe."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif world.size > 1:
        local = launch_number("LOCAL_WORLD_SIZE", world.size, 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def mixed_precision(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled (norms and log-softmax stay float32); nothing elsewhere."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_named_checkpoint(option: str, directory: str, device: torch.device | str = "cpu"):
    """load_checkpoint, its errors (no such folder, a run folder, a damaged file) naming the option that gave it."""
    from satic.model.checkpoint import load_checkpoint

    try:
        return load_checkpoint(directory, device)
    except SaticError as err:
        raise SaticError(f"{option}={directory}: {err}") from None


def load_weights_into(model: torch.nn.Module, directory: str, vocab: Vocabulary,
                      option: str = "init_from") -> FeatureSpec:
    """init_from (or resume): copy a checkpoint's weights into `model` (same shapes and vocabulary; K and dropout
    may differ). Returns the region features the checkpoint was trained on."""
    from satic.model.checkpoint import layout_differences

    checkpoint = load_named_checkpoint(option, directory)
    vocab.check_same(checkpoint.vocab, f"{option}={directory}", "give it a checkpoint trained on this data's "
                     "cocotalk.json")
    given = checkpoint.model.state_dict()
    problems = layout_differences(model.state_dict(), given)
    if problems:
        fix = ("give the student the teacher's layers, d_model, d_ff and vocabulary" if option == "init_from" else
               "resume with the model settings of the run being resumed, or train into another out_dir")
        shown = first_few(problems, sep="; ")
        raise SaticError(f"{option}={directory}: its weights do not fit this model ({shown}); {fix}")
    model.load_state_dict(given)
    return checkpoint.features


def feature_differences(theirs: FeatureSpec, mine: FeatureSpec) -> list[str]:
    """How a checkpoint's region features differ from this run's, beyond their size: "use_box True (this run:
    False)", ...; grid features of another extractor (another image size, say) differ too."""
    names = ("kind", "norm_att_feat", "use_box") + (("extractor",) if theirs.kind == mine.kind == "grid" else ())
    return [f"{name} {getattr(theirs, name)} (this run: {getattr(mine, name)})"
            for name in names if not _same_features(name, getattr(theirs, name), getattr(mine, name))]


def _same_features(name: str, theirs, mine) -> bool:
    """One FeatureSpec field of two runs alike; a grid extractor's weights file is alike under another name when
    its bytes are the same (a copy, or the same file named relative to another folder)."""
    if name != "extractor" or theirs == mine:
        return theirs == mine
    rest = [{key: value for key, value in extractor.items() if key != "weights"} for extractor in (theirs, mine)]
    files = [extractor.get("weights") for extractor in (theirs, mine)]
    return (rest[0] == rest[1] and all(isinstance(f, str) and os.path.isfile(f) for f in files)
            and filecmp.cmp(*files, shallow=False))


def check_decoding_fits(config: TrainConfig, model) -> None:
    """Validation's and self-critical sampling's decoding options against the model (a ModelConfig), before the
    first step: the decoder would refuse them only at the first validation, save_every iterations in, or at the
    first self-critical step, without naming the option."""
    from satic.decoding.cache import longest_max_length

    k, longest = model.group_size, longest_max_length(model.max_positions, model.group_size)
    uses = [("eval.max_length", config.eval.max_length, "validation could decode no word")]
    if config.scst.after_epoch >= 0:  # an empty sample would leave the loss without a gradient
        uses.append(("scst.max_length", config.scst.max_length, "self-critical training could sample no word"))
    for option, length, empty in uses:
        if length < k:
            raise SaticError(f"{option}={length} is shorter than one group of K={k} words, so {empty}; set {option} "
                             f"to at least {k} (the reference's default is 20)")
        if length > longest:
            raise SaticError(f"{option}={length} is longer than the model's position table allows (K={k}, "
                             f"model.max_positions={model.max_positions}: at most {longest} words); set {option} to "
                             f"at most {longest}, or raise model.max_positions")
    if config.eval.beam_size > model.num_outputs:
        raise SaticError(f"eval.beam_size={config.eval.beam_size} is more beams than the model has outputs "
                         f"({model.num_outputs}: the vocabulary's words and the end); set eval.beam_size to at most "
                         f"{model.num_outputs}")


def check_batch_fits(config: TrainConfig, model, seq_length: int, world: World, device: torch.device) -> None:
    """A batch whose word log-probs alone outgrow the device's memory (a data.batch_size or seq_per_img with digits too
    many), refused before the loader tries to gather it image by image, for hours."""
    rows = -(-config.data.batch_size // world.size) * config.data.seq_per_img  # this process's share
    need = 4 * rows * (seq_length + 1) * model.num_outputs
    over = beyond_memory(need, device)
    if over is not None:
        raise SaticError(f"data.batch_size={config.data.batch_size} images x data.seq_per_img="
                         f"{config.data.seq_per_img} captions of up to {seq_length} words need, for one batch's word "
                         f"log-probs alone, {over}; lower data.batch_size or data.seq_per_img")


def check_labels_fit(model, seq_length: int, label_h5: Path, teacher: str | None = None) -> None:
    """The label captions against the model's position table (a ModelConfig; `teacher`: the kd.teacher
    option that names it), before the first step: the first training pass would refuse them, without naming
    the option."""
    k = model.group_size
    positions = (seq_length + 1 + k) // k * k - 1  # SATModel.forward's decoder length for labels[:, :-1]
    if positions <= model.max_positions:
        return
    if teacher is None:
        limit, fix = f"model.max_positions={model.max_positions}", f"set model.max_positions to at least {positions}"
    else:
        limit, fix = f"the {model.max_positions} of {teacher}", f"use a teacher of at least {positions} positions"
    raise SaticError(f"the captions of {label_h5} have up to {seq_length} words, which a K={k} model reads at "
                     f"{positions} positions, more than {limit}; {fix}, or prepare shorter labels (satic prepro "
                     "--max-length)")


class Objective(torch.nn.Module):
    """The model's differentiable passes behind one forward, so that DDP sees (and syncs) each of them."""

    def __init__(self, model: torch.nn.Module):
        from satic.decoding import Decoder

        super().__init__()
        self.model = model
        self.sampler = Decoder(model)  # eager: SCST samples in train mode, with autograd on

    def forward(self, att_feats: torch.Tensor, att_masks: torch.Tensor | None, seq: torch.Tensor | None = None,
                mode: str = "xe", sampling: DecodeOptions | None = None, generator: torch.Generator | None = None,
                rerun: bool = False):
        """mode 'xe': teacher-forced pass over seq = labels[:, :-1] -> log-probs (R, L+1, V+1).
        'sample': draw captions with autograd on -> (output rows, draws, log-probs of the draws) (R, T) each;
        rerun=True runs the decoder over the whole prefix at every step (Decoder.prefill).
        'score': log-probs (R, T) of given draws `seq` in one parallel pass (fresh dropout masks)."""
        from satic.decoding import draw_logprobs

        if mode == "sample":
            return self.draw(att_feats, att_masks, sampling, generator, rerun)
        if mode == "score":
            return draw_logprobs(self.model, att_feats, att_masks, seq)
        return self.model(att_feats, att_masks, seq)

    def draw(self, att_feats: torch.Tensor, att_masks: torch.Tensor | None, sampling: DecodeOptions,
             generator: torch.Generator | None, rerun: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SCST's sampling pass (differentiable where grad is enabled) -> output rows, draws and their log-probs."""
        from satic.decoding import sample

        rows = att_feats.size(0) * sampling.sample_n
        state = self.sampler.prefill(att_feats, att_masks, sampling.sample_n, sampling.max_length,
                                     differentiable=True, rerun=rerun)
        result = sample(state, rows, sampling, generator, att_feats.device)
        return result.seq, result.draws, result.draw_logprobs


def _global_mean(total: torch.Tensor, count: torch.Tensor, world: World) -> torch.Tensor:
    """A rank's share of the global-batch mean; DDP averages gradients over ranks, hence * world.size."""
    global_count = all_sum(count, world).clamp_min(1.0)
    return total / global_count * world.size


def xe_loss(net: torch.nn.Module, batch, words: torch.Tensor, config: TrainConfig, world: World = World(),
            teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """This rank's share of an optimizer step's mean XE (+ token KD) loss on one batch; `words` counts the
    labelled words of the whole step (every batch, every rank)."""
    labels, masks = batch.labels, batch.masks  # (R, L+2)
    device = labels.device
    with mixed_precision(device, config.bf16):
        logprobs = net(batch.att_feats, batch.att_masks, labels[:, :-1]).float()  # (R, L+1, V+1)
    total, _ = cross_entropy(logprobs, labels[:, 1:], masks[:, 1:], config.optim.label_smoothing)
    if teacher is not None:
        with torch.no_grad(), mixed_precision(device, config.bf16):
            teacher_lp = teacher(batch.att_feats, batch.att_masks, labels[:, :-1]).float()
        kl, _ = token_kl(logprobs, teacher_lp, masks[:, 1:])
        total = total + config.kd.weight * kl
    return total / words.clamp_min(1.0) * world.size


def scst_loss(net: torch.nn.Module, model: torch.nn.Module, batch, config: TrainConfig, cider, bleu,
              generator: torch.Generator, world: World = World()) -> tuple[torch.Tensor, np.ndarray]:
    """This rank's share of the self-critical loss on one batch, and its samples' rewards (B*n,) (ranks' shares
    differ in size, so the global mean reward is a sum over ranks divided by all samples).
    `net` is the Objective (or its DDP wrapper) around `model`; cider / bleu score token rows."""
    from satic.decoding import decode

    cfg = config.scst
    device = batch.att_feats.device
    options = cfg.sampling_options()
    # fresh masks on the prefix need it run again each step; without decoder dropout the cache is the same function
    rerun = cfg.prefix_dropout == "fresh" and model.training and model.config.dropout > 0
    if cfg.logprobs == "sampling":  # the loss backpropagates through the pass that drew the words
        with mixed_precision(device, config.bf16):
            seq, draws, logprobs = net(batch.att_feats, batch.att_masks, mode="sample", sampling=options,
                                       generator=generator, rerun=rerun)
    else:  # sample without grad, then score the draws again in parallel (other dropout masks)
        with torch.no_grad():
            if rerun:  # the regions' keys/values once per image, not once per row and step (RecomputeStepper)
                objective = getattr(net, "module", net)  # not through DDP: this pass is not differentiated
                seq, draws, _ = objective.draw(batch.att_feats, batch.att_masks, options, generator, rerun)
            else:
                sampled = decode(model, batch.att_feats, batch.att_masks, options, generator=generator)
                seq, draws = sampled.seq, sampled.draws
        with mixed_precision(device, config.bf16):
            logprobs = net(batch.att_feats, batch.att_masks, draws, mode="score")
    rewards = caption_rewards(seq.cpu().numpy(), batch.gts, cider, cfg.cider_weight, bleu, cfg.bleu_weight)
    greedy_rewards = None
    if cfg.baseline == "greedy":
        with eval_mode(model), torch.no_grad():
            greedy = decode(model, batch.att_feats, batch.att_masks,
                            DecodeOptions(sample_method="greedy", max_length=cfg.max_length))
        greedy_rewards = caption_rewards(greedy.seq.cpu().numpy(), batch.gts, cider, cfg.cider_weight, bleu,
                                         cfg.bleu_weight)
    adv = torch.as_tensor(advantages(rewards, cfg.sample_n, cfg.baseline, greedy_rewards),
                          dtype=torch.float32, device=device)  # (B*n,)
    total, count = self_critical(logprobs.float(), seq, adv, cfg.semantics)
    return _global_mean(total, count, world), rewards


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: OptimConfig) -> None:
    """Gradient clipping as configured, then the optimizer step (the gradients are in place)."""
    if config.grad_clip > 0:
        if config.grad_clip_mode == "value":
            # one clamp per tensor: the foreach path clamps twice (min, then max), 2x slower on CPU
            cuda = next(model.parameters()).device.type == "cuda"
            torch.nn.utils.clip_grad_value_(model.parameters(), config.grad_clip, foreach=cuda)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()


class Trainer:
    """Holds one run's parts; `run()` trains until max_iters / max_epochs."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = pick_device(config.device)
        self.world = init_world(self.device)
        if config.data.batch_size < self.world.size:  # a rank without images would fail in its first forward
            raise SaticError(f"data.batch_size={config.data.batch_size} is the global batch, shared by the "
                             f"{self.world.size} torchrun processes, so some would get no image; set data.batch_size "
                             f"to at least {self.world.size}, or start at most {config.data.batch_size} process"
                             f"{'es' if config.data.batch_size > 1 else ''} (--nproc_per_node)")
        if self.world.size > 1 and self.device.type == "cuda":
            self.device = pick_device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        set_threads(config.threads, self.world)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        if self.world.is_main:
            run_data.ensure_builtin(config.data)
        barrier(self.world)
        self.data = run_data.open_training_data(config.data, config.seed, bleu=config.scst.bleu_weight > 0)
        self.references = self._validation_references()
        self.best_metric = selection_metric(self.references)
        model_config = check_model_section(config.model, len(self.data.vocab), self.data.feature_dim)
        check_decoding_fits(config, model_config)
        check_labels_fit(model_config, self.data.captions.seq_length, self.data.captions.label_h5)
        check_batch_fits(config, model_config, self.data.captions.seq_length, self.world, self.device)
        from satic.model.transformer import build_model

        self.model = build_model(model_config, "config.model", "check its sizes").to(self.device)
        self.teacher = self._load_teacher()
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=0.0, betas=tuple(config.optim.betas), eps=config.optim.eps,
            weight_decay=config.optim.weight_decay, fused=True,  # one kernel over all weights: ~4.5x faster on CPU
        )
        self.schedule = ScheduleState()
        self.progress = Progress()
        self.sampler = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + self.world.rank)
        self.resumed_from = self._resume_source()
        self._stepping = False  # inside an optimizer step (a state saved then would be half-done)
        self.continued_best: Path | None = None  # init_continue: the continued run's best checkpoint
        if self.resumed:
            self._restore(self.resumed_from)
        elif config.init_from:
            theirs = load_weights_into(self.model, config.init_from, self.data.vocab)
            if (differs := feature_differences(theirs, self.data.features)) and self.world.is_main:
                print(f"note: init_from={config.init_from} was trained on other region features: "
                      f"{', '.join(differs)}; its weights start this run all the same, as the reference's do, but "
                      "they read these numbers as other ones: set data.norm_att_feat and data.use_box as its run "
                      "did, unless this is meant")
            if config.init_continue:
                self._continue(Path(config.init_from))
        # every rank seeds its own streams (dropout, sampling); the model starts equal on all ranks
        if not self.resumed:
            torch.manual_seed(config.seed * 1000 + self.world.rank)
        self.net: torch.nn.Module = Objective(self.model)
        self.ddp = None
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.net = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        # a validation record at the resumed iteration stays only where the checkpoint holds that validation
        self.log = (RunLog(self.out_dir, self.progress.iteration if self.resumed else None,
                           validated=self.progress.validated_here) if self.world.is_main else None)

    # ---- set-up -------------------------------------------------------------------------------

    def _validation_references(self):
        """Raw references for validation on rank 0 (the only one that validates); None without any."""
        if not self.world.is_main:
            return None
        references = load_validation_references(self.data.captions, self.config.eval, self.config.data.dir)
        if references is None:
            print(f"note: no raw reference captions for validation (eval.references, or references.json from "
                  f"satic prepro in {self.config.data.dir}); best/ is picked by CIDEr-D against the label file's "
                  "captions, not by the reference's CIDEr against the raw ones")
        return references

    def _load_teacher(self) -> torch.nn.Module | None:
        """The KD teacher, only when its weight is non-zero (a zero weight never runs it)."""
        if self.config.kd.weight <= 0:
            return None
        option = f"kd.teacher={self.config.kd.teacher}"
        teacher = load_named_checkpoint("kd.teacher", self.config.kd.teacher, self.device)
        self.data.vocab.check_same(teacher.vocab, option, "use a teacher trained on the same vocabulary")
        # the teacher reads the student's regions: they must be the ones it was trained on (size, norm, box)
        differs = feature_differences(teacher.features, self.data.features)
        if teacher.config.att_feat_size != self.data.feature_dim:
            differs.insert(0, f"{teacher.config.att_feat_size} numbers per region (this run: "
                              f"{self.data.feature_dim})")
        if differs:
            raise SaticError(f"{option} was trained on other region features: {', '.join(differs)}; set "
                             "data.features, data.norm_att_feat and data.use_box as the teacher's run did, or use a "
                             "teacher trained on these features")
        check_labels_fit(teacher.config, self.data.captions.seq_length, self.data.captions.label_h5, option)
        teacher.model.requires_grad_(False)
        return teacher.model.train(self.config.kd.teacher_dropout)

    def _resume_source(self) -> Path | None:
        resume = self.config.resume
        if resume is None:
            return None
        if resume == "auto":
            return find_checkpoint(self.out_dir / "last")
        found = find_checkpoint(Path(resume))
        if found is None:
            raise SaticError(f"resume={resume}: no run checkpoint there (it needs model.safetensors, config.json "
                             "and train_state.pt as written by `satic train`)")
        return found

    def _restore(self, directory: Path) -> None:
        state = load_state(directory)
        with reading_state(directory):
            saved = {**state["config"], "model": complete_model_section(state["config"].get("model") or {})}
            changed = [d for d in describe_difference(saved, to_dict(self.config))
                       if d.split(".")[0].split(":")[0] not in RESUMABLE_CHANGES]
        # first: a model that does not fit ends it here
        load_weights_into(self.model, str(directory), self.data.vocab, "resume")
        if changed and self.world.is_main:
            print(f"resume: the config differs from the run being resumed ({'; '.join(changed)}); "
                  "the config given now wins, so the run will not match an uninterrupted one")
        self._load_position(state, directory)
        with reading_state(directory):
            self.data.train.load_state_dict(state["loader"])
            saved = len(state["rng"])  # the saved run's processes, one stream of each kind per rank
            if not saved or len(state["sampler"]) != saved:
                raise ValueError(f"rng and sampler hold {saved} and {len(state['sampler'])} ranks' streams")
            if self.world.rank < saved:
                set_rng_state(state["rng"][self.world.rank])
                self.sampler.set_state(state["sampler"][self.world.rank])
            else:  # a rank the saved run did not have: its own fresh streams, not a copy of another rank's
                torch.manual_seed(self.config.seed * 1000 + self.world.rank)
        if saved != self.world.size and self.world.is_main:
            print(f"resume: the run being resumed had {saved} process{'es' if saved > 1 else ''}, this one has "
                  f"{self.world.size}; the ranks' random streams and shares of each batch differ, so the run will not "
                  "match an uninterrupted one")
        if self.world.is_main:
            print(f"resumed from {directory} at iteration {self.progress.iteration}, epoch {self.progress.epoch}")

    def _load_position(self, state: dict, directory: Path) -> None:
        """Adam's state, the schedule's position and the run's progress from a saved train_state.pt (the
        learning rate is then set by this run's schedule at every step)."""
        with reading_state(directory):
            flags = {key: value for key, value in self.optimizer.param_groups[0].items()
                     if isinstance(value, bool) and key not in ("foreach", "fused")}
            self.optimizer.load_state_dict(state["optimizer"])
            check_adam_state(self.optimizer, {param: name for name, param in self.model.named_parameters()}, flags)
            self.schedule = read_schedule(state["schedule"])
            self.progress = read_progress(state["progress"])
            # the two count the same steps and epochs (_step), and the first step's rate is of the schedule's
            position = (self.schedule.step, self.schedule.epoch)
            if position != (self.progress.iteration, self.progress.epoch):
                raise ValueError(f"schedule step {position[0]}, epoch {position[1]} is not the run's iteration "
                                 f"{self.progress.iteration}, epoch {self.progress.epoch}")
            if self.progress.iteration and not self.optimizer.state:
                raise ValueError(f"Adam's state is empty after {self.progress.iteration} iterations")

    def _continue(self, source: Path) -> None:
        """init_continue: carry on the run that wrote `source`, as the reference's --start_from does."""
        found = find_checkpoint(source)
        if found is None:
            raise SaticError(f"init_continue=true: {source} has no {STATE_FILE}; give init_from a run checkpoint "
                             "written by `satic train` (such as OUT_DIR/last), or set init_continue=false to start "
                             "from its weights with a fresh optimizer")
        state = load_state(found)
        try:
            with reading_state(found):
                self.data.train.load_state_dict(state["loader"])  # checks the data, split, seed and batch shape
        except SaticError as err:
            raise SaticError(f"init_continue=true: the data position of {found} does not fit this run: {err}; "
                             "or set init_continue=false") from None
        self._load_position(state, found)
        self.progress.validation_due = False  # a stage of its own: it validates at its own save_every
        best = found.parent / "best"
        if self.progress.best_score is not None and find_checkpoint(best) is not None:
            self.continued_best = best
        group = self.optimizer.param_groups[0]
        if self.world.is_main:
            print(f"continuing {found} at iteration {self.progress.iteration}, epoch {self.progress.epoch}: Adam betas "
                  f"{tuple(group['betas'])}, eps {group['eps']} and moments from there, best score "
                  f"{self.progress.best_score} ({self.progress.best_metric})")

    # ---- one iteration ------------------------------------------------------------------------

    def _shard(self, batch):
        start, end = shard_bounds(len(batch.image_ids), self.world)
        return run_data.batch_to(run_data.slice_batch(batch, start, end), self.device)

    def _step(self, scst: bool) -> StepStats:
        """One optimizer step over accum_steps global batches; returns the global mean loss."""
        cfg = self.config.optim
        lr = learning_rate(cfg, self.schedule, self.model.config.d_model)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self.data.next_train_batch() for _ in range(cfg.accum_steps)]
        # as the reference's loop: one epoch more after a step whose data wrapped round the split (its
        # `epoch += 1` on the loader's wrapped flag), so a batch larger than the split counts one epoch, not
        # the number of passes it holds (the same count whenever a step holds at most the split)
        if any(batch.wrapped for batch in batches):
            self.progress.epoch += 1
        self.schedule.epoch = self.progress.epoch
        images = sum(len(b.image_ids) for b in batches)
        batches = [self._shard(b) for b in batches]
        # XE: one mean over every counted word of the step's batches on every rank
        xe_words = None if scst else all_sum(sum(b.masks[:, 1:].sum() for b in batches), self.world)
        losses, reward_sum, samples = [], 0.0, 0
        for micro, batch in enumerate(batches):
            sync = self.ddp is None or micro == cfg.accum_steps - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                if scst:  # the word count depends on the samples: the mean of the batches' means
                    loss, rewards = scst_loss(self.net, self.model, batch, self.config, self.data.cider,
                                              self.data.bleu, self.sampler, self.world)
                    loss = loss / cfg.accum_steps
                    reward_sum += float(rewards.sum())
                    samples += len(rewards)
                else:
                    loss = xe_loss(self.net, batch, xe_words, self.config, self.world, self.teacher)
                loss.backward()
            losses.append(loss.detach() / self.world.size)
        step_loss = all_sum(torch.stack(losses).sum(), self.world).item()
        if not math.isfinite(step_loss):
            raise SaticError(
                f"the training loss became {step_loss} at iteration {self.progress.iteration + 1} (epoch "
                f"{self.progress.epoch}); nothing after the last checkpoint ({self.out_dir / 'last'}) was saved. "
                "Check the features for NaN/Inf (satic features check) or lower optim.lr, then resume=auto"
            )
        clip_and_step(self.model, self.optimizer, cfg)
        self.schedule.step += 1
        self.progress.iteration += 1
        reward = None
        if scst:  # the mean over every sample of every rank (a mean of the ranks' means weighs uneven shares wrong)
            totals = torch.tensor([reward_sum, samples], dtype=torch.float64)
            if self.world.size > 1:  # NCCL reduces only CUDA tensors
                totals = all_sum(totals.to(self.device), self.world).cpu()
            reward_sum, samples = totals.tolist()
            reward = reward_sum / samples
        return StepStats(step_loss, reward, images)

    # ---- validation and checkpoints -----------------------------------------------------------

    def _validate_and_save(self, schedule: bool = True) -> None:
        """Validate (each rank decodes a share, rank 0 scores), update best score and (unless `schedule` is False)
        the schedule everywhere, then write last (and best). Ctrl-C on the way puts the score and schedule back as
        they were before it, so that what is saved on it (_save_interrupted) is the state of a run that had not
        validated here."""
        progress = self.progress
        before = (progress.best_score, progress.best_metric, list(progress.history))
        schedule_before = self.schedule.state_dict()
        try:
            self._validate_and_save_once(schedule)
        except KeyboardInterrupt:
            progress.best_score, progress.best_metric, progress.history = before
            self.schedule = ScheduleState(**schedule_before)
            raise

    def _validate_and_save_once(self, schedule: bool) -> None:
        is_best = False
        self.progress.validation_due = False
        with torch.random.fork_rng(devices=[]):  # validation leaves the training RNG streams alone
            # every rank decodes its share of the split; rank 0 scores the whole
            metrics = validate(self.model, self.data, self.config.eval, self.device, self.references,
                               self.config.data.seq_per_img, self.config.optim.label_smoothing,
                               self.config.data.batch_size, self.world)
        if self.world.is_main:
            score = metrics[self.best_metric]
            if self.progress.best_metric != self.best_metric:
                if self.progress.best_score is not None:
                    print(f"note: the best score carried over, {self.progress.best_score:.4f}, is "
                          f"{self.progress.best_metric}; this run picks best/ by {self.best_metric}, so its first "
                          "validation sets best/ afresh")
                self.progress.best_score, self.progress.best_metric = None, self.best_metric
            self.progress.history.append({"iteration": self.progress.iteration, "epoch": self.progress.epoch,
                                          **metrics})
            is_best = self.progress.best_score is None or score > self.progress.best_score
            if is_best:
                self.progress.best_score = score
            tqdm.write(validation_line(self.out_dir.name, self.progress.iteration, self.progress.epoch, metrics,
                                       self.best_metric, is_best))
            if schedule:
                observe_validation(self.config.optim, self.schedule, score)
            self.log.write("val", self.progress.iteration, metrics)
        self._sync_validation_state()
        states = self._gather_states()
        if self.world.is_main:
            self._save(self.out_dir / "last", states)
            if is_best:
                write_run_checkpoint(self.out_dir / "best", lambda d: copy_files(self.out_dir / "last", d))
        barrier(self.world)

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    def _complete_best(self) -> None:
        """A run killed after it saved last/ with a new best score, before best/ was swapped in (last/ and best/
        are two writes), left best/ stale or missing (best.partial, best.old): the resumed checkpoint is the best,
        so best/ becomes its copy, as the uninterrupted run's would be."""
        source = self.resumed_from
        if source is None or source.parent.resolve() != self.out_dir.resolve() or source.name not in ("last", "best"):
            return
        from satic.model.checkpoint import read_checkpoint_config

        best = self.out_dir / "best"
        last_validation = self.progress.history[-1] if self.progress.history else {}  # as the checkpoint saved it
        source_is_best = self.progress.best_score is not None and (
            last_validation.get("iteration") == self.progress.iteration
            and last_validation.get(self.progress.best_metric) == self.progress.best_score)
        try:
            best_whole = (best / STATE_FILE).is_file() and (
                read_checkpoint_config(best).get("extra") or {}).get("best_score") == self.progress.best_score
        except SaticError:  # a damaged config: not the best checkpoint
            best_whole = False
        if source_is_best and not best_whole:
            print(f"resume: best/ was not written at iteration {self.progress.iteration} (the run stopped between "
                  f"saving last/ and best/); copying {source.name}/ there", file=sys.stderr)
            write_run_checkpoint(best, lambda d: copy_files(source, d))
        elif not best.exists() and (best.with_name("best.old") / STATE_FILE).is_file():
            # cut between its two renames by a signal that skipped that validation: the best before it is whole
            best.with_name("best.old").rename(best)
        # what writes cut short left beside a whole checkpoint (the next save of each would remove it, and a run
        # resumed at its end makes none)
        whole = [source] + ([best] if best.is_dir() else [])
        for leftover in [folder.with_name(folder.name + end) for folder in whole for end in (".partial", ".old")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def _announce_interrupt(self) -> None:
        self._outlive_loader_workers()
        if self.world.size == 1:
            print(f"\n{self.out_dir.name}: finishing iteration {self.progress.iteration + 1}, then saving last/ "
                  "there; Ctrl-C again to stop at once", file=sys.stderr)

    def _outlive_loader_workers(self) -> None:
        """The run is stopping, and its loader workers may be stopping with it: a job scheduler (SLURM's scancel,
        say) signals every process of the job. torch's SIGCHLD handler would then raise a RuntimeError into the step
        being finished or the checkpoint being saved; a batch the step still needs is made in this process."""
        self.data.stopping = True
        if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _save_interrupted(self, saved_at: int, validation_due: bool = False) -> None:
        """As the reference on Ctrl-C: last/ at the iteration the run stopped at, not validated, so that
        resume=auto (or init_continue) goes on from there, exactly (a validation the signal cut short is
        skipped, as the reference's; one due where the step held the signal is done first on resume, as the
        reference, which redoes that step). One process only: under torchrun the ranks would have to meet to gather
        their states, and each may have stopped at another point. A second Ctrl-C inside a step leaves a
        half-done step, which is not saved."""
        if self.world.size > 1 or self.progress.iteration in (0, saved_at):
            return
        if self._stepping:
            kept = f"last/ stays at iteration {saved_at}" if saved_at >= 0 else "nothing was saved"
            print(f"{self.out_dir.name}: stopped inside iteration {self.progress.iteration + 1}; {kept}",
                  file=sys.stderr)
            return
        print(f"{self.out_dir.name}: interrupted at iteration {self.progress.iteration}; saving last/ there (not "
              "validated): resume=auto continues from it", file=sys.stderr)
        self.progress.validation_due = validation_due
        self._save(self.out_dir / "last", self._gather_states())

    def _sync_validation_state(self) -> None:
        if self.world.size == 1:
            return
        import torch.distributed as dist

        payload = [(self.progress.best_score, self.progress.best_metric, self.progress.history,
                    self.schedule.state_dict())]
        dist.broadcast_object_list(payload, src=0)
        best, metric, history, schedule = payload[0]
        self.progress.best_score, self.progress.best_metric, self.progress.history = best, metric, history
        self.schedule = ScheduleState(**schedule)

    def _gather_states(self) -> dict:
        """RNG and sampler states of every rank (each rank continues its own streams on resume)."""
        mine = {"rng": rng_state(), "sampler": self.sampler.get_state()}
        if self.world.size == 1:
            return {"rng": [mine["rng"]], "sampler": [mine["sampler"]]}
        import torch.distributed as dist

        gathered = [None] * self.world.size
        dist.all_gather_object(gathered, mine)
        return {"rng": [g["rng"] for g in gathered], "sampler": [g["sampler"] for g in gathered]}

    def _save(self, target: Path, states: dict) -> None:
        from satic.model.checkpoint import save_checkpoint

        state = {
            "config": to_dict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "progress": {"iteration": self.progress.iteration, "epoch": self.progress.epoch,
                         "best_score": self.progress.best_score, "best_metric": self.progress.best_metric,
                         "history": self.progress.history, "validation_due": self.progress.validation_due},
            "loader": self.data.train.state_dict(),
            **states,
        }
        extra = {"iteration": self.progress.iteration, "epoch": self.progress.epoch,
                 "best_score": self.progress.best_score, "best_metric": self.progress.best_metric,
                 "val": self.progress.history[-1] if self.progress.history else None,
                 "decode": checkpoint_defaults(self.config.eval.max_length, self.config.eval.length_penalty,
                                               self.config.eval.remove_bad_endings)}

        def contents(directory: Path) -> None:
            save_checkpoint(directory, self.model, self.data.vocab, self.data.features, extra)
            save_state(directory, state)

        write_run_checkpoint(target, contents)

    # ---- the loop -----------------------------------------------------------------------------

    def _finished(self) -> bool:
        cfg = self.config
        return (0 <= cfg.max_iters <= self.progress.iteration) or (0 <= cfg.max_epochs <= self.progress.epoch)

    def summary(self) -> str:
        """What this run will do, in two lines: the model, the data and objective, the length, validation."""
        cfg, c = self.config, self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        objective = "XE" + (f" + {cfg.kd.weight:g} x token KD" if self.teacher is not None else "")
        if cfg.scst.after_epoch == 0:
            objective = "self-critical"
        elif cfg.scst.after_epoch > 0:
            objective += f", self-critical from epoch {cfg.scst.after_epoch}"
        total = self._total_iterations()
        length = counted(total, "iteration") if total is not None else "until stopped"
        start = (f"resuming at iteration {self.progress.iteration:,}" if self.resumed
                 else f"from {cfg.init_from}" if cfg.init_from else "from scratch")
        images = len(validation_image_ids(self.data.captions, cfg.eval))
        picks = (f"{self.best_metric} against {self.references.path.name}" if self.references is not None
                 else f"{self.best_metric} against the label file")
        layers = counted(c.num_layers, "layer")
        size = f"{params / 1e6:.1f} M parameters" if params >= 1e5 else counted(params, "parameter")
        return (f"{self.out_dir.name}: K={c.group_size}, {layers}, d_model {c.d_model}, "
                f"{counted(c.num_heads, 'head')}, {size}; "
                f"{counted(self.data.train_images, 'training image')}, {cfg.data.batch_size} per batch x "
                f"{counted(cfg.data.seq_per_img, 'caption')}; {objective}; {length}, {start}\n"
                f"{self.out_dir.name}: validation every {counted(cfg.save_every, 'iteration')} on "
                f"{counted(images, cfg.eval.split + ' image')}; best/ by {picks}")

    def _total_iterations(self) -> int | None:
        cfg = self.config
        per_epoch = math.ceil(self.data.train_images / (cfg.data.batch_size * cfg.optim.accum_steps))
        limits = [cfg.max_iters] if cfg.max_iters >= 0 else []
        limits += [cfg.max_epochs * per_epoch] if cfg.max_epochs >= 0 else []
        return min(limits) if limits else None

    def run(self) -> TrainResult:
        cfg = self.config
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / "config.json", to_dict(cfg))
        self.model.train()
        if self.world.is_main:
            print(self.summary())
        bar = new_bar(total=self._total_iterations(), initial=self.progress.iteration, desc=self.out_dir.name,
                      disable=not (cfg.progress and self.world.is_main), dynamic_ncols=True)
        saved_at = self.progress.iteration if cfg.resume else -1
        continued_past_end = (self.resumed or cfg.init_continue) and self._finished()
        if continued_past_end and self.world.is_main:
            limits = " and ".join(f"{name}={value}" for name, value in (("max_iters", cfg.max_iters),
                                                                        ("max_epochs", cfg.max_epochs)) if value >= 0)
            which = "resumed" if self.resumed else "continued"
            tqdm.write(f"note: the {which} run is at iteration {self.progress.iteration}, epoch {self.progress.epoch}, "
                       f"already at or past {limits}: nothing to train; raise it to train on", file=sys.stdout)
        if self.resumed and self.world.is_main:
            self._complete_best()
        if self.resumed and self.progress.validation_due:
            self._validate_and_save()
        if not self.resumed and self.continued_best is not None and self.world.is_main:
            # best/ starts as the continued run's best: it is replaced only by a better score
            write_run_checkpoint(self.out_dir / "best", lambda d: copy_files(self.continued_best, d))
        elif not self.resumed and cfg.init_from and not cfg.init_continue:
            # The starting weights set the first best, so best/ never falls below them. The reference validates
            # first at save_every: its reduce-on-plateau has not seen this score.
            self._validate_and_save(schedule=False)
            saved_at = self.progress.iteration
        validating, started_at = False, self.progress.iteration
        try:
            while not self._finished():
                scst = 0 <= cfg.scst.after_epoch <= self.progress.epoch
                start = time.perf_counter()
                with deferred_interrupts(self._announce_interrupt):  # Ctrl-C waits for the step's end: the state
                    # saved on it is whole; set inside the block, so that a signal just before finds the last step whole
                    self._stepping = True
                    stats = self._step(scst)
                    self._stepping = False  # inside the block: a held Ctrl-C is raised as it ends
                    # the step's log record too: last/ saved on a held Ctrl-C is at this iteration, and a resumed
                    # run does not write its record again
                    speed = stats.images / (time.perf_counter() - start)
                    lr = self.optimizer.param_groups[0]["lr"]
                    postfix = {"loss": f"{stats.loss:.3f}", "lr": f"{lr:.2e}", "img/s": f"{speed:.1f}"}
                    if stats.reward is not None:
                        postfix["reward"] = f"{stats.reward:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                    if self.log is not None and (self.progress.iteration % cfg.log_every == 0 or self._finished()):
                        record = {"epoch": self.progress.epoch, "loss": stats.loss, "lr": lr, "images_per_s": speed}
                        if stats.reward is not None:
                            record["reward"] = stats.reward
                        self.log.write("train", self.progress.iteration, record)
                if self.progress.iteration % cfg.save_every == 0:
                    validating = True  # a signal from here on cuts the validation short: it is skipped
                    self._validate_and_save()
                    saved_at = self.progress.iteration
                validating = False
            if saved_at != self.progress.iteration:
                if cfg.save_at_end:
                    validating = True
                    self._validate_and_save()
                elif self.world.is_main and not continued_past_end:  # that one said "nothing to train" above
                    kept = f"last/ holds iteration {saved_at}" if saved_at >= 0 else "nothing was saved"
                    tqdm.write(f"note: the run stopped at iteration {self.progress.iteration}, between two saves "
                               f"(every {cfg.save_every}); as the reference, {kept}. Set save_at_end=true to also save "
                               "where a run stops", file=sys.stdout)  # on a line of its own, under the bar
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (satic.cli raises it as one)
            self._outlive_loader_workers()
            bar.close()
            # a validation is due only where one of this run's steps ended: a continued run stopped before its
            # first step is at the continued run's iteration, which its own schedule does not validate
            due = self.progress.iteration != started_at and (self.progress.iteration % cfg.save_every == 0
                                                             or (cfg.save_at_end and self._finished()))
            redo = cfg.resume_redoes_validation and not self.progress.validated_here  # one cut short
            self._save_interrupted(saved_at, (not validating or redo) and due)
            raise
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
        if self.world.is_main:
            plot_curves(self.out_dir / LOG_FILE, self.out_dir / CURVES_FILE, str(self.out_dir))
        last, best = self.out_dir / "last", self.out_dir / "best"
        return TrainResult(self.out_dir, self.progress.iteration, self.progress.epoch, self.progress.best_score,
                           self.progress.best_metric or self.best_metric, last if last.exists() else None,
                           best if best.exists() else None)


def validation_line(run: str, iteration: int, epoch: int, metrics: dict, selected: str, is_best: bool) -> str:
    """One console line per validation: the metric that picks best/ first, then the others (not the toolkit's
    BLEU-1..3), and the loss."""
    shown = [selected] + [m for m in ("CIDEr", "CIDEr-D", "Bleu_4", "METEOR", "ROUGE_L", "SPICE")
                          if m in metrics and m != selected]
    scores = ", ".join(f"{m} {metrics[m]:.4f}{' (best)' if m == selected and is_best else ''}" for m in shown)
    return f"{run}: iteration {iteration}, epoch {epoch}: validation {scores}, loss {metrics['loss']:.4f}"


def run_inputs(config: TrainConfig) -> dict[str, str]:
    """The checkpoints a run reads besides a resumed one, by option."""
    inputs = {"init_from": config.init_from, "kd.teacher": config.kd.teacher if config.kd.weight > 0 else None}
    return {option: path for option, path in inputs.items() if path}


def train(config: TrainConfig) -> TrainResult:
    from satic.training.rundir import hold_run_dir

    # under torchrun the processes connect first: only rank 0 checks out_dir, and the others must learn that it
    # refused the run rather than wait for it until torchrun kills them
    world = init_world(pick_device(config.device))
    try:
        with contextlib.ExitStack() as held:
            try:
                # one run per out_dir
                held.enter_context(hold_run_dir(config.out_dir, config.resume, config.overwrite, run_inputs(config)))
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the others gone already: this error is the one to show
                    rank_0_failed(world, True)
                raise
            if rank_0_failed(world, False):
                raise SaticError(f"rank {world.rank} stopped: rank 0 refused the run (its error is above)")
            trainer = Trainer(config)
            try:
                return trainer.run()
            finally:
                try:
                    trainer.data.close()
                finally:
                    if trainer.log is not None:  # closed before a failed run's files are removed (hold_run_dir)
                        trainer.log.close()
    except RuntimeError as err:
        if world.size > 1 and lost_peer(err):  # another rank failed and said why; not a traceback here too
            raise SaticError(f"rank {world.rank} stopped: another process of the run has gone (its error says "
                             f"why): {str(err).splitlines()[0]}") from None
        raise
    finally:
        close_world(world)
