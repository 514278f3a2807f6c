"""Greedy, sampling and beam search for any group size K, batched over images (and beams), with the
reference's semantics; and the log-probs of given sequences in one parallel pass (for SCST)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from satic.decoding.cache import RecomputeStepper, Stepper, decode_capacity
from satic.decoding.engine import DecodeState, Decoder, as_decoder, native_beam_search, native_sample
from satic.decoding.ensemble import Ensemble, EnsembleStepper
from satic.decoding.options import DecodeOptions, DecodeResult
from satic.device import beyond_memory
from satic.errors import SaticError
from satic.model.transformer import SATModel, block_mask, mask_bias

UNK_PENALTY = 1000.0  # beam search only, on the last word (UNK's place), as the reference
DONE_SCORE = -1000.0  # running score of a beam once it is stored as finished (it stays in the beam)
TRIGRAM_PENALTY = -0.693 * 2.0  # log(1/2) * alpha with the reference's alpha = 2


def start(model: SATModel | Decoder | Ensemble, att_feats: Tensor, att_masks: Tensor | None, decoder_rows: int,
          max_length: int, use_cache: bool = True) -> Stepper:
    """Encode the images and return a stepper for B * decoder_rows rows (image-major)."""
    if isinstance(model, Ensemble):
        steppers = [start(m, att_feats, att_masks, decoder_rows, max_length, use_cache) for m in model.models]
        return EnsembleStepper(steppers, model.weights)
    decoder = as_decoder(model)
    if not use_cache:
        return RecomputeStepper(decoder.model, att_feats, att_masks, decoder_rows)
    return decoder.prefill(att_feats, att_masks, decoder_rows, max_length)


@torch.no_grad()
def decode(model: SATModel | Decoder | Ensemble, att_feats: Tensor, att_masks: Tensor | None = None,
           options: DecodeOptions = DecodeOptions(), generator: torch.Generator | None = None,
           use_cache: bool = True) -> DecodeResult:
    """Caption a batch: att_feats (B, N, D), att_masks (B, N) bool or None -> DecodeResult with
    B * n rows (n = n_best for beam search, sample_n otherwise). Call model.eval() first unless
    dropout during decoding is wanted."""
    if att_feats.dim() != 3 or 0 in att_feats.shape[:2]:
        raise SaticError(f"att_feats must be (images >= 1, regions >= 1, dim), got shape {tuple(att_feats.shape)}")
    if options.max_length < model.config.group_size:
        raise SaticError(f"max_length {options.max_length} is shorter than one group of K={model.config.group_size} "
                         "words")
    if options.beam_size > 1:  # before the key/value cache of every beam is allocated
        check_width(options.beam_size // options.beam_groups, model.config.num_outputs)
    check_cache_memory(model, att_feats.size(0), options, att_feats.device)
    if options.beam_size > 1 and options.beam_groups > 1 and model.config.group_size == 1:
        width = options.beam_size // options.beam_groups  # one decode per group: the groups run in turn
        steppers = [start(model, att_feats, att_masks, width, options.max_length, use_cache)]
        members = native_members(steppers[0])
        native = native_beam_search(*members, att_feats.size(0), options, staggered=True) if members else None
        if native is not None:  # every group in one native call, over the one cache
            return DecodeResult(*native)
        return staggered_beam_search(
            lambda: steppers.pop() if steppers else start(model, att_feats, att_masks, width, options.max_length,
                                                           use_cache), att_feats.size(0), options, att_feats.device)
    stepper = start(model, att_feats, att_masks, options.decoder_rows, options.max_length, use_cache)
    if options.beam_size > 1:
        return beam_search(stepper, att_feats.size(0), options, att_feats.device)
    return sample(stepper, att_feats.size(0) * options.sample_n, options, generator, att_feats.device)


def trigram_penalty(prefix: Tensor, num_outputs: int) -> Tensor:
    """prefix (R, p) words -> (R, V+1) penalty: TRIGRAM_PENALTY per earlier trigram (prefix[-2], prefix[-1], w)."""
    p = prefix.size(1)
    match = (prefix[:, : p - 2] == prefix[:, p - 2 : p - 1]) & (prefix[:, 1 : p - 1] == prefix[:, p - 1 :])  # (R, p-2)
    counts = prefix.new_zeros(prefix.size(0), num_outputs, dtype=torch.float32)
    counts.scatter_add_(1, prefix[:, 2:], match.float())
    return counts * TRIGRAM_PENALTY


def suppress_unk(logprobs: Tensor) -> Tensor:
    """(..., V+1) -> the same with the last word (UNK's index) lowered by UNK_PENALTY, as the reference's beam
    search."""
    return torch.cat([logprobs[..., :-1], logprobs[..., -1:] - UNK_PENALTY], -1)


def forbid_repeat(logprobs: Tensor, previous: Tensor) -> Tensor:
    """decoding_constraint: logprobs (R, V+1), previous (R, 1) words -> a word never follows itself."""
    return logprobs.scatter(1, previous, float("-inf"))


def block_trigrams(logprobs: Tensor, prefix: Tensor) -> Tensor:
    """logprobs (R, V+1), prefix (R, p) -> the words that would repeat a trigram of the prefix penalised."""
    return logprobs + trigram_penalty(prefix, logprobs.size(1))


def constrain(logprobs: Tensor, seq: Tensor, pos: int, options: DecodeOptions) -> Tensor:
    """Apply decoding_constraint and block_trigrams to logprobs (R, V+1) of position pos, given seq (R, T)."""
    if options.decoding_constraint and pos > 0:
        logprobs = forbid_repeat(logprobs, seq[:, pos - 1 : pos])
    if options.block_trigrams and pos >= 3:
        logprobs = block_trigrams(logprobs, seq[:, :pos])
    return logprobs


def diversity_penalty(logprobs: Tensor, earlier: Tensor, strength: float) -> Tensor:
    """Diverse beam search: logprobs (B, W, V+1) of one group, earlier (B, n) the words the earlier groups
    chose at this position -> each word lowered by strength per earlier use."""
    used = logprobs.new_zeros(logprobs.size(0), logprobs.size(-1)).scatter_add_(
        1, earlier, logprobs.new_ones(earlier.shape))  # (B, V+1)
    return logprobs - strength * used[:, None, :]


def stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries along the last dimension and their indices, equal values in the order of their index:
    what a stable descending sort puts first, as the native beam search does (topk's order among equal values is
    unspecified; so is the order of the reference's torch.sort, which is not stable: see ARCHITECTURE.md). Where
    the (k+1)-th largest is below the k-th, topk chose the same entries, and only their order is settled, on k
    entries per row: one float topk over the rows (log-probs over COCO's 9,488 outputs). Else one topk over int64
    keys, the float's order in the high half and the reversed index in the low, costs about 2.5x a float topk (9x
    at COCO's vocabulary), a full sort 50x. (A NaN with its sign bit set would rank last where sort ranks every NaN
    first; log-probs hold none.)"""
    k = min(k, x.size(-1))
    values, index = x.topk(min(k + 1, x.size(-1)), dim=-1)  # (..., k + 1): one more shows a tie at the k-th
    if not values.isnan().any() and (k == x.size(-1) or bool((values[..., k] < values[..., k - 1]).all())):
        index, by_index = index[..., :k].sort(dim=-1)
        values, by_value = values[..., :k].gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
        return values, index.gather(-1, by_value)
    if x.dtype != torch.float32:  # the keys hold a float32's bits: others sort
        ranked = x.sort(dim=-1, descending=True, stable=True)
        return ranked.values[..., :k], ranked.indices[..., :k]
    bits = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0, which compare equal
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # an int32 in the floats' order
    last = x.size(-1) - 1
    keys = (ordered << 32) | (last - torch.arange(x.size(-1), device=x.device))  # equal values: the lower index first
    index = last - (keys.topk(k, dim=-1).values & 0xFFFFFFFF)
    return x.gather(-1, index), index


def select_beams(sums: Tensor, logprobs: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The best `width` (beam, word) pairs by summed score, ties in the reference's order (candidate-major,
    stable): sums (B, rows) and logprobs (B, rows, V+1) -> new sums, parent rows, words and the chosen
    entries of logprobs, each (B, W)."""
    rows = logprobs.size(1)
    top_lp, top_word = stable_topk(logprobs, width)  # (B, rows, C)
    ranked = candidate_major(sums[:, :, None] + top_lp).sort(dim=1, descending=True, stable=True)
    new_sum, order = ranked.values[:, :width], ranked.indices[:, :width]  # (B, W)
    return new_sum, order % rows, candidate_major(top_word).gather(1, order), candidate_major(top_lp).gather(1, order)


def choose(logprobs: Tensor, options: DecodeOptions, generator: torch.Generator | None) -> Tensor:
    """(R, V+1) -> (R,) words: argmax, or a draw after temperature, top-k and top-p filtering."""
    if options.sample_method == "greedy":
        return logprobs.max(-1).indices
    scores = logprobs if options.temperature == 1.0 else logprobs / options.temperature
    if options.top_k:
        kth = scores.topk(min(options.top_k, scores.size(1)), dim=-1).values[:, -1:]  # (R, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = F.softmax(sorted_scores, -1)
        drop = probs.cumsum(-1) - probs >= options.top_p  # words after the nucleus; the first is always kept
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    weights = (scores - scores.max(-1, keepdim=True).values).exp()  # shifted: no underflow at low temperature
    return draw(weights, generator)


def draw(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(R, V) non-negative weights -> (R,) indices drawn with probability weight / row sum, by inverting the
    cumulative sum at one uniform number per row (torch.multinomial costs several times more on the CPU).
    A zero weight is never drawn: the first index whose cumulative sum exceeds u always adds weight."""
    cumulative = weights.cumsum(-1)  # (R, V)
    total = cumulative[:, -1:]  # (R, 1)
    uniform = torch.rand(total.shape, generator=generator, device=weights.device, dtype=weights.dtype)
    u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))  # in [0, total)
    # a row without any weight (every word -inf, e.g. an ensemble's underflowed mixture with decoding_constraint):
    # word 0, the argmax of such a row, as greedy decoding picks (searchsorted would return V, out of range)
    return torch.searchsorted(cumulative, u, right=True)[:, 0].masked_fill(~(total[:, 0] > 0), 0)


class HostFlag:
    """A device flag read by the host without stalling a GPU: on CUDA each read returns the value given one
    step earlier (None at first), so the host queues the next step while the GPU still runs this one;
    elsewhere the value itself. Greedy decoding stops one step late on CUDA, on rows whose output is
    already final (K=2 greedy at batch 1 on an H100, with the step graph: 9.2 -> 8.1 ms together with
    fused attention). Beam search keeps its immediate reads: it waits on `done.any()` at every position
    anyway, and an extra step there is a whole step of host work (measured slower)."""

    def __init__(self, device: torch.device | str) -> None:
        self.lagged = torch.device(device).type == "cuda"
        self.pending: tuple[Tensor, torch.cuda.Event] | None = None

    def read(self, flag: Tensor) -> bool | None:
        if not self.lagged:
            return bool(flag)
        previous = None
        if self.pending is not None:
            value, ready = self.pending
            ready.synchronize()
            previous = bool(value)
        value = torch.empty((), dtype=torch.bool, pin_memory=True)
        value.copy_(flag, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self.pending = (value, ready)
        return previous


def native_members(stepper: Stepper) -> tuple[list[DecodeState], list[float]] | None:
    """The decode states a native loop would run over, and their mixture weights: a DecodeState alone, or
    every member of an ensemble whose members are all DecodeStates; else None."""
    if isinstance(stepper, DecodeState):
        return [stepper], [1.0]
    if isinstance(stepper, EnsembleStepper) and (states := stepper.native_states()) is not None:
        return states, stepper.mix
    return None


def independent(options: DecodeOptions) -> bool:
    """Plain greedy: no choice within a step depends on another position's word."""
    return options.sample_method == "greedy" and not (options.decoding_constraint or options.block_trigrams)


def sample(stepper: Stepper, rows: int, options: DecodeOptions, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> DecodeResult:
    """Greedy or sampled decoding of `rows` rows, as the reference samples. Steps start at t = 0, K, 2K...
    while t + K <= max_length, and stop once every row is finished. A row is finished once any word of
    its group is 0: the group is kept as chosen, later groups are output as 0 and fed as 0.

    Besides the output, the result holds the words drawn at every step (`draws`, also where the output
    is 0) and their log-probs (`draw_logprobs`); with grad enabled these keep their graph, so that a
    policy-gradient loss can backpropagate through the very pass that drew the words."""
    k, length = stepper.group_size, options.max_length
    running = HostFlag(device)
    native = None
    if (members := native_members(stepper)) is not None:
        native = native_sample(*members, options, generator)
    if native is not None:  # the same loop, run natively: one call instead of a Python loop over steps
        seq, draws, draw_lp, live = native
    else:
        outputs, drawn, drawn_lp, alive = sample_loop(stepper, rows, options, generator, device, running)
        extra = length - k * len(outputs)
        seq, draws, draw_lp = (F.pad(torch.cat(parts, 1), (0, extra)) for parts in (outputs, drawn, drawn_lp))
        # the same as live_groups(seq, k): a row's groups are live up to and including its finishing one
        live = F.pad(torch.cat(alive, 1).repeat_interleave(k, 1), (0, extra))  # (R, T)
    if running.lagged:  # a lagged read may run one step after every row finished: that step's draws are 0
        ran = live.any(0, keepdim=True)  # (1, T)
        draws, draw_lp = draws * ran, draw_lp * ran
    logprobs_out = draw_lp * live
    return DecodeResult(seq, logprobs_out, logprobs_out.detach().double().sum(1), draws, draw_lp)


def sample_loop(stepper: Stepper, rows: int, options: DecodeOptions, generator: torch.Generator | None,
                device: torch.device | str, running: HostFlag) -> tuple[list[Tensor], ...]:
    """sample()'s loop over steps: per step the output group (R, K), the words drawn and their log-probs
    (R, K), and whether each row was live before the step (R, 1)."""
    k, length = stepper.group_size, options.max_length
    tokens = torch.zeros(rows, k, dtype=torch.long, device=device)
    outputs, drawn, drawn_lp, alive = [], [], [], []  # per step; gathered once at the end (fewer ops per step)
    seq = torch.zeros(rows, length, dtype=torch.long, device=device) if not independent(options) else None
    unfinished = torch.ones(rows, 1, dtype=torch.bool, device=device)
    for t in range(0, length - k + 1, k):
        logprobs = stepper.step(tokens)  # (R, K, V+1)
        if seq is None:  # the K positions of a step do not depend on each other: one argmax picks them all
            best = logprobs.max(-1)  # its values are the gather of the chosen words' log-probs, gradient included
            words, chosen = best.indices, best.values  # (R, K)
        else:
            words = torch.empty(rows, k, dtype=torch.long, device=device)
            with torch.no_grad():  # the choice itself is not differentiated
                for i in range(k):
                    word = choose(constrain(logprobs[:, i], seq, t + i, options), options, generator)
                    seq[:, t + i] = words[:, i] = word  # later positions of the group see it (constraints)
            chosen = logprobs.gather(2, words[..., None])[..., 0]
        tokens = words * unfinished  # rows finished before this step are output (and fed) as 0
        if seq is not None:
            seq[:, t : t + k] = tokens
        outputs.append(tokens)
        drawn.append(words)
        drawn_lp.append(chosen)
        alive.append(unfinished)  # this step's group is live: the row had not finished before it
        unfinished = unfinished & words.all(1, keepdim=True)  # words >= 0, so this is (tokens > 0).all
        if running.read(unfinished if rows == 1 and not running.lagged else unfinished.any()) is False:
            break
    return outputs, drawn, drawn_lp, alive


def live_groups(seq: Tensor, group_size: int) -> Tensor:
    """(R, T) output rows -> (R, T) bool: the positions of each row's groups up to and including its
    finishing group (the first group holding a 0); False after it and beyond the last whole group."""
    rows, length = seq.shape
    groups = length // group_size
    ends = (seq[:, : groups * group_size].reshape(rows, groups, group_size) == 0).any(2).long()  # (R, G)
    live = ((ends.cumsum(1) - ends) == 0).repeat_interleave(group_size, 1)  # (R, G*K)
    return torch.cat([live, live.new_zeros(rows, length - groups * group_size)], 1)


class FinishedBeams:
    """Per (image, diversity group), the `width` best finished beams so far, ranked as the reference's
    stable sort of all finished beams by score: ties keep the order in which beams finished."""

    def __init__(self, batch: int, groups: int, width: int, length: int, device: torch.device | str) -> None:
        self.seq = torch.zeros(batch, groups, width, length, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch, groups, width, length, device=device)
        self.score = torch.full((batch, groups, width), float("-inf"), dtype=torch.float64, device=device)

    def add(self, g: int, seq: Tensor, logprobs: Tensor, score: Tensor, done: Tensor) -> None:
        """seq, logprobs (B, W, T), score (B, W) float64 and done (B, W): the beams of group g at one position."""
        finite_floor = torch.finfo(torch.float64).min  # a real score never ties with an empty slot
        new = torch.where(done, score.clamp(min=finite_floor), float("-inf"))
        keys = torch.cat([self.score[:, g], new], 1)  # (B, 2W), kept entries first
        width = self.score.size(2)
        order = keys.sort(dim=1, descending=True, stable=True).indices[:, :width]  # (B, W)
        take = order[..., None].expand(-1, -1, seq.size(-1))
        self.seq[:, g] = torch.cat([self.seq[:, g], seq], 1).gather(1, take)
        self.logprobs[:, g] = torch.cat([self.logprobs[:, g], logprobs], 1).gather(1, take)
        self.score[:, g] = keys.gather(1, order)

    def result(self, n_best: int) -> DecodeResult:
        """Each image's first n_best kept beams, the groups in order (the reference's done_beams)."""
        batch, groups, width, length = self.seq.shape
        beams = groups * width
        return DecodeResult(self.seq.view(batch, beams, length)[:, :n_best].reshape(-1, length),
                            self.logprobs.view(batch, beams, length)[:, :n_best].reshape(-1, length),
                            self.score.view(batch, beams)[:, :n_best].reshape(-1))

    def settled(self, sums: Tensor) -> bool:
        """Without a length penalty a finished score only falls, so once every group's worst kept beam beats
        every running sum (and the -1000 a finishing beam restarts from) nothing can change the result. Not so
        with a negative diversity_lambda, which raises scores: see `can_settle`."""
        ceiling = sums.double().amax(-1).clamp(min=DONE_SCORE)  # (B, G)
        return bool((self.score[..., -1] >= ceiling).all())


def extend_beams(seq: Tensor, seq_logprobs: Tensor, images: Tensor, parent: Tensor, word: Tensor, chosen_lp: Tensor,
                 pos: int) -> tuple[Tensor, Tensor]:
    """A group's beams (B, W, T) after choosing (parent, word) at pos: their parents' rows, with the word and
    its log-prob at pos."""
    seq = seq[images, parent]
    seq[:, :, pos] = word
    seq_logprobs = seq_logprobs[images, parent]
    seq_logprobs[:, :, pos] = chosen_lp
    return seq, seq_logprobs


def store_finished(finished: "FinishedBeams", g: int, seq: Tensor, seq_logprobs: Tensor, new_sum: Tensor,
                   word: Tensor, pos: int, options: DecodeOptions) -> Tensor:
    """Store group g's beams that finish at pos (a 0, or the last position) in `finished`; returns the group's
    running sums, DONE_SCORE for those beams."""
    done = word == 0 if pos < options.max_length - 1 else torch.ones_like(word, dtype=torch.bool)
    if done.any():
        finished.add(g, seq, seq_logprobs, options.penalize_length(pos + 1, new_sum.double()), done)
    return new_sum.masked_fill(done, DONE_SCORE)


def expand_group(finished: "FinishedBeams", g: int, seq: Tensor, seq_logprobs: Tensor, sums: Tensor,
                 current: Tensor, earlier: Tensor | None, images: Tensor, pos: int, options: DecodeOptions
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group g's choice at position pos: its beams seq, seq_logprobs (B, W, T) with running sums (B, W) and
    this position's (constrained) log-probs current (B, W, V+1); earlier (B, n): the words the earlier groups
    hold at pos (None for group 0), each lowering its word by the diversity penalty; images: arange (B, 1).
    The best W (beam, word) pairs extend the beams with the model's own, unpenalised log-probs; beams that
    finish are stored. -> (seq, seq_logprobs, sums, parent (B, W): the row each beam continues)."""
    batch, width, num_outputs = current.shape
    augmented = current if earlier is None else diversity_penalty(current, earlier, options.diversity_lambda)
    rows = 1 if pos == 0 else width  # at the first position every beam of a group is the same
    new_sum, parent, word, chosen_lp = select_beams(sums[:, :rows], augmented[:, :rows], width)
    if earlier is not None:  # the model's log-probs, not the penalised ones
        chosen_lp = current.reshape(batch, -1).gather(1, parent * num_outputs + word)
    seq, seq_logprobs = extend_beams(seq, seq_logprobs, images, parent, word, chosen_lp, pos)
    sums = store_finished(finished, g, seq, seq_logprobs, new_sum, word, pos, options)
    return seq, seq_logprobs, sums, parent


def can_settle(options: DecodeOptions) -> bool:
    """Whether beam search may stop once `FinishedBeams.settled`: only where a running sum never rises, so without a
    length penalty and without a negative diversity_lambda (a bonus per use of an earlier group's word, which
    raises a later group's sums past any bound); else it runs every position, as the reference."""
    return not options.length_penalty and (options.beam_groups == 1 or options.diversity_lambda >= 0)


def check_cache_memory(model: SATModel | Decoder | Ensemble, images: int, options: DecodeOptions,
                       device: torch.device) -> None:
    """Refuse a decode whose key/value cache alone outgrows the device's memory (a huge sample_n, beam or batch),
    before torch fails to allocate it deep inside (or the machine swaps)."""
    members = model.models if isinstance(model, Ensemble) else [model]
    c, rows = model.config, images * options.decoder_rows
    itemsize = sum((m.model if isinstance(m, Decoder) else m).dtype.itemsize for m in members)
    need = itemsize * c.num_layers * 2 * rows * decode_capacity(options.max_length, c.group_size) * c.d_model
    over = beyond_memory(need, device)
    if over is not None:
        raise SaticError(f"decoding {images} image(s) x {options.decoder_rows} rows each (beam_size or sample_n) "
                         f"needs, for its key/value cache, {over}; lower sample_n or beam_size, or caption fewer "
                         "images at once")


def check_width(width: int, num_outputs: int) -> None:
    if width > num_outputs:
        raise SaticError(f"{width} beams per group exceed the {num_outputs} outputs of the model; use a smaller "
                         "beam_size")


def candidate_major(x: Tensor) -> Tensor:
    """(B, rows, C) -> (B, C * rows): candidate c of every row before candidate c + 1 of any, the order
    in which the reference ranks (beam, word) pairs (its stable sort keeps ties in this order)."""
    return x.transpose(1, 2).reshape(x.size(0), -1)


def beam_search(stepper: Stepper, batch: int, options: DecodeOptions, device: torch.device | str = "cpu"
                ) -> DecodeResult:
    """The reference's (diverse) beam search for any K, for all images and beams at once.

    Each step's K positions are expanded one at a time: position i picks the best (beam, word)
    pairs by summed log-prob, then the distributions of positions > i (predicted in parallel from
    the previous group) follow the chosen parent beams. A beam that emits 0, or reaches the last
    position, is stored as finished and its running score becomes -1000."""
    members = native_members(stepper)
    native = native_beam_search(*members, batch, options) if members is not None else None
    if native is not None:  # the same search in one native call (one group, no constraints)
        return DecodeResult(*native)
    k, length = stepper.group_size, options.max_length
    groups, beams = options.beam_groups, options.beam_size
    width = beams // groups
    logprobs = stepper.step(torch.zeros(batch * beams, k, dtype=torch.long, device=device))
    num_outputs = logprobs.size(-1)
    seq = torch.zeros(batch, groups, width, length, dtype=torch.long, device=device)
    seq_logprobs = torch.zeros(batch, groups, width, length, device=device)
    sums = torch.zeros(batch, groups, width, device=device)
    finished = FinishedBeams(batch, groups, width, length, device)
    images = torch.arange(batch, device=device)[:, None]  # (B, 1)
    first_rows = images[:, :, None] * beams + torch.arange(groups, device=device)[None, :, None] * width  # (B, G, 1)
    parents = torch.empty(batch, groups, width, dtype=torch.long, device=device)  # start-of-step row of each beam
    for t in range(0, length, k):
        step_lp = logprobs.view(batch, groups, width, k, num_outputs)
        # cloned: later rows follow their parents in place
        step_lp = suppress_unk(step_lp) if options.suppress_unk else step_lp.clone()
        for i in range(min(k, length - t)):
            pos = t + i
            flat_seq = seq.view(-1, length)
            current = constrain(step_lp[:, :, :, i].reshape(-1, num_outputs), flat_seq, pos, options)  # out of place
            current = current.view(batch, groups, width, num_outputs)
            for g in range(groups):
                earlier = seq[:, :g, :, pos].reshape(batch, -1) if g else None  # (B, g * W)
                seq[:, g], seq_logprobs[:, g], sums[:, g], parent = expand_group(
                    finished, g, seq[:, g], seq_logprobs[:, g], sums[:, g], current[:, g], earlier, images, pos,
                    options)
                if i + 1 < k:  # the step's later positions follow their parents
                    step_lp[:, g, :, i + 1 :] = step_lp[:, g, :, i + 1 :][images, parent]
                parents[:, g] = parent if i == 0 else parents[:, g].gather(1, parent)
        if t + k >= length or (can_settle(options) and finished.settled(sums)):
            break
        stepper.reorder((first_rows + parents).reshape(-1))
        logprobs = stepper.step(seq[..., t : t + k].reshape(-1, k))
    return finished.result(options.n_best)


def staggered_beam_search(start_group, batch: int, options: DecodeOptions,
                          device: torch.device | str = "cpu") -> DecodeResult:
    """The reference's diverse beam search for K=1, where group g runs g positions behind group 0: at
    position p, group g is penalised by the words the earlier groups hold at p by then, after their beams
    have forked for (g - earlier group) more positions. A group never depends on later ones, so the groups
    run one after another, each on its own stepper from start_group() (width rows per image), and each
    earlier group's words after every position stand in for the moment a later group reads them. Every
    group runs all max_length positions, as the reference's."""
    length, groups = options.max_length, options.beam_groups
    width = options.beam_size // groups
    images = torch.arange(batch, device=device)[:, None]  # (B, 1)
    finished = FinishedBeams(batch, groups, width, length, device)
    histories: list[Tensor] = []  # per group run: (T, B, W, T) its beams' words after each position
    for g in range(groups):
        stepper = start_group()
        logprobs = stepper.step(torch.zeros(batch * width, 1, dtype=torch.long, device=device))
        num_outputs = logprobs.size(-1)
        seq = torch.zeros(batch, width, length, dtype=torch.long, device=device)
        seq_logprobs = torch.zeros(batch, width, length, device=device)
        sums = torch.zeros(batch, width, device=device)
        history = torch.zeros(length, batch, width, length, dtype=torch.long, device=device)
        for pos in range(length):
            step_lp = logprobs.view(batch * width, num_outputs)
            step_lp = suppress_unk(step_lp) if options.suppress_unk else step_lp
            current = constrain(step_lp, seq.view(-1, length), pos, options).view(batch, width, num_outputs)
            earlier = None  # what each earlier group e holds at pos once it has run pos + g - e positions
            if g > 0:
                earlier = torch.cat([histories[e][min(pos + g - e, length - 1)][:, :, pos] for e in range(g)], 1)
            seq, seq_logprobs, sums, parent = expand_group(finished, g, seq, seq_logprobs, sums, current, earlier,
                                                           images, pos, options)
            history[pos] = seq
            if pos + 1 < length:
                stepper.reorder((images * width + parent).reshape(-1))
                logprobs = stepper.step(seq[:, :, pos].reshape(-1, 1))
        histories.append(history)
    return finished.result(options.n_best)


def _parallel_logprobs(model: SATModel, att_feats: Tensor, att_masks: Tensor | None, seq: Tensor,
                       used: int) -> Tensor:
    """Log-probs (R, used, V+1), with grad, of the first `used` positions (whole groups) that decoding the
    output rows seq (R, T) fed: K leading zeros, then the output, under the block mask (no padding mask)."""
    rows, k = seq.size(0), model.config.group_size
    memory, memory_bias = model.encode(att_feats, att_masks)
    memory_kv = model.memory_kv(memory, memory_bias)  # per image: an image's rows share them in cross-attention
    tokens = torch.cat([seq.new_zeros(rows, k), seq[:, : used - k]], 1)  # (R, used)
    self_bias = mask_bias(block_mask(used, k, seq.device), memory.dtype)
    return model.logprobs(model.decode(tokens, memory_kv, memory_bias, self_bias))


def _check_rows(att_feats: Tensor, seq: Tensor, name: str) -> None:
    if seq.dim() != 2 or seq.dtype != torch.long:
        raise SaticError(f"{name} must be a (rows, length) tensor of word ids, got {tuple(seq.shape)} {seq.dtype}")
    if seq.size(0) % att_feats.size(0):
        raise SaticError(f"{seq.size(0)} rows of {name} do not divide evenly among {att_feats.size(0)} images; "
                         "give the rows image-major, the same number per image")


def sequence_logprobs(model: SATModel, att_feats: Tensor, att_masks: Tensor | None, seq: Tensor) -> Tensor:
    """Log-probs (B*n, T), with grad, of given decoded rows seq (B*n, T), in one parallel pass under the
    inference rule (K leading zeros, block mask, no padding mask). Equal to what decode() returned for
    the same rows: positions after the finishing group, and beyond the last whole group, are 0."""
    _check_rows(att_feats, seq, "seq")
    rows, length = seq.shape
    k = model.config.group_size
    used = length // k * k  # positions decoding can produce
    if used == 0:
        return seq.new_zeros(rows, length, dtype=torch.float32)
    logprobs = _parallel_logprobs(model, att_feats, att_masks, seq, used)  # (R, used, V+1)
    chosen = logprobs.gather(2, seq[:, :used, None])[..., 0]  # (R, used)
    return F.pad(chosen, (0, length - used)) * live_groups(seq, k)


def output_rows(draws: Tensor, group_size: int) -> Tensor:
    """The reference's finishing rule: (R, T) words drawn at every step -> the output rows, where every
    group after a row's finishing group (the first group holding a 0) is 0."""
    return draws * live_groups(draws, group_size)


def draw_logprobs(model: SATModel, att_feats: Tensor, att_masks: Tensor | None, draws: Tensor) -> Tensor:
    """Log-probs (R, T), with grad, of the words drawn at every step, in one parallel pass: what sample()
    returns as `draw_logprobs` for the same draws (R, T) and dropout off. Every step the sampling loop ran
    has them, also in a row's groups after its finishing group (where the output is 0 but a word was
    drawn); positions of steps the loop never ran (all rows finished, or beyond the last whole group) are 0."""
    _check_rows(att_feats, draws, "draws")
    rows, length = draws.shape
    seq = output_rows(draws, model.config.group_size)
    used = int(live_groups(seq, model.config.group_size).any(0).sum())  # the steps run, in positions
    if used == 0:
        return draws.new_zeros(rows, length, dtype=torch.float32)
    logprobs = _parallel_logprobs(model, att_feats, att_masks, seq, used)  # (R, used, V+1)
    return F.pad(logprobs.gather(2, draws[:, :used, None])[..., 0], (0, length - used))
