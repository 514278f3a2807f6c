"""Our vectorised CIDEr / CIDEr-D against the coco-caption toolkit and a per-pair CIDEr-D."""
import math
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider as ToolkitCider

from satic.errors import SaticError
from satic.evaluation import Cider, CiderD, DocumentFrequency, ngrams
from satic.evaluation.cider import CaptionRows, cider_scores, sets_and_slots, text_rows

SAMPLE = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "val2014_generated_captions.tsv"


def real_corpus(num_images, num_refs=5, offset=0):
    """Real generated COCO captions; each image's references are its neighbours in sorted order,
    so they share prefixes with the candidate as human references do (deterministic)."""
    lines = [l.split("\t", 1) for l in SAMPLE.read_text().splitlines() if not l.startswith("#")]
    captions = sorted(c for _, c in lines)
    n = len(captions)
    gts, res = {}, {}
    for k in range(num_images):
        i = (offset + 7 * k) % n
        res[k] = [captions[i]]
        gts[k] = [captions[(i + d) % n] for d in (-2, -1, 1, 2, 3, 4, 5)[: num_refs]]
    return gts, res


class PerPairCiderD:
    """ruotianluo/cider's CiderD scorer, written plainly: one loop per candidate and reference."""

    def __init__(self, df, ref_len_count, sigma=6.0, n=4):
        self.df, self.ref_len, self.sigma, self.n = df, math.log(float(ref_len_count)), sigma, n

    def vector(self, caption):
        words = caption.split()
        counts = Counter(tuple(words[i:i + n]) for n in range(1, self.n + 1) for i in range(len(words) - n + 1))
        vec = [{} for _ in range(self.n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (self.ref_len - math.log(max(1.0, self.df.get(g, 0.0))))
        norms = [math.sqrt(sum(v * v for v in vec[n].values())) for n in range(self.n)]
        length = max(len(words) - 1, 0)  # the number of bigrams, whatever n is (the toolkit cooks 4-grams)
        return vec, norms, length

    def score(self, candidate, refs):
        vh, nh, lh = self.vector(candidate)
        total = np.zeros(self.n)
        for ref in refs:
            vr, nr, lr = self.vector(ref)
            for n in range(self.n):
                val = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        return float(np.mean(total)) / len(refs) * 10.0


def training_df(num_images=400):
    gts, _ = real_corpus(num_images, offset=3)
    return DocumentFrequency.from_references([[c.split() for c in refs] for refs in gts.values()])


def test_cider_equals_toolkit_on_real_captions():
    gts, res = real_corpus(300)
    mean, scores = Cider().compute_score(gts, res)
    ref_mean, ref_scores = ToolkitCider().compute_score(gts, res)
    assert scores.shape == (300,)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-9)
    assert mean == pytest.approx(ref_mean, abs=1e-9)
    assert 0.5 < mean < 10  # neighbours overlap: a non-trivial score


EDGE_CASES = {
    "empty": ([""], ["a dog runs", "a dog"]),
    "one_reference": (["a cat on a mat"], ["a cat sits on the mat"]),
    "repeated_words": (["dog dog dog dog dog dog"], ["a dog and a dog", "dog dog"]),
    "unseen_words": (["zebra quux frobnicates"], ["a zebra in a field", "the zebra eats"]),
    "one_word": (["dog"], ["dog", "a"]),
    "empty_reference": (["a dog"], ["", "a dog"]),
    "identical": (["a man riding a horse"], ["a man riding a horse"] * 3),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_cider_edge_cases_equal_toolkit(case):
    gts, res = real_corpus(20)
    res["edge"], gts["edge"] = [EDGE_CASES[case][0][0]], EDGE_CASES[case][1]
    _, scores = Cider().compute_score(gts, res)
    _, ref_scores = ToolkitCider().compute_score(gts, res)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-9)


def test_cider_single_image_is_zero_like_toolkit():
    gts, res = {1: ["a dog runs"]}, {1: ["a dog runs"]}
    assert Cider().compute_score(gts, res)[1].tolist() == [0.0]
    assert ToolkitCider().compute_score(gts, res)[1].tolist() == [0.0]


def test_cider_d_equals_per_pair_reference_scorer():
    df = training_df()
    reference = PerPairCiderD(dict(df.items()), df.num_ref_sets)
    gts, res = real_corpus(150, offset=11)
    for case, (hyp, refs) in EDGE_CASES.items():
        gts[case], res[case] = refs, hyp
    _, scores = CiderD(df).compute_score(gts, res)
    expected = [reference.score(res[i][0], gts[i]) for i in gts]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)


def encode(captions, vocab):
    """Text -> zero-padded int rows (16 wide) with the end token 0, as label rows are."""
    rows = np.zeros((len(captions), 16), dtype=np.int64)
    for r, c in enumerate(captions):
        ids = [vocab.setdefault(w, len(vocab) + 1) for w in c.split()][:16]
        rows[r, : len(ids)] = ids
    return rows


def array_to_str(row):
    """The reference's rule: words up to and including the first 0."""
    out = []
    for t in row:
        out.append(str(int(t)))
        if t == 0:
            break
    return " ".join(out)


def test_token_ids_equal_reference_rewards():
    """A reward batch: 5 samples per image, scored as the reference's SCST does (index strings)."""
    vocab = {}
    train, _ = real_corpus(400, offset=3)
    train_rows = [encode(refs, vocab) for refs in train.values()]
    df = DocumentFrequency.from_references([[array_to_str(r).split() for r in rows] for rows in train_rows])
    gts, res = real_corpus(40, offset=5)
    references = [encode(gts[k], vocab) for k in gts]
    rng = np.random.default_rng(0)
    samples = []
    for k in gts:  # the candidate itself, and random perturbations with early/late/no end token
        base = encode(res[k], vocab)[0]
        for s in range(5):
            row = base.copy() if s == 0 else rng.integers(0, 60, size=16)
            if s == 3 and k % 2:
                row[:] = 0  # ends at once: the caption is just the end token "0"
            if s == 4:
                row[row == 0] = 7  # no end token at all: the whole row counts
            samples.append(row)
    candidates = np.stack(samples)  # (200, 16)
    rewards = CiderD(df).score_token_ids(candidates, references)
    reference = PerPairCiderD(dict(df.items()), df.num_ref_sets)
    expected = [reference.score(array_to_str(c), [array_to_str(r) for r in references[m // 5]])
                for m, c in enumerate(candidates)]
    assert rewards.shape == (200,)
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=1e-9)


def test_token_ids_image_index_and_torch_input():
    torch = pytest.importorskip("torch")
    vocab = {}
    gts, res = real_corpus(6)
    refs = [encode(gts[k], vocab) for k in gts]
    cands = np.concatenate([encode(res[k], vocab) for k in gts])
    df = DocumentFrequency.from_references([[array_to_str(r).split() for r in rows] for rows in refs])
    scorer = CiderD(df)
    in_order = scorer.score_token_ids(cands, refs)
    order = np.array([3, 0, 5, 1, 4, 2])
    shuffled = scorer.score_token_ids(torch.from_numpy(cands[order]), [torch.from_numpy(r) for r in refs],
                                      image_index=order)
    np.testing.assert_array_equal(shuffled, in_order[order])


def test_token_ids_reference_widths_do_not_add_an_end_token():
    """A 16-word reference without 0 must not gain a 0 when stacked with wider arrays."""
    df = DocumentFrequency.from_references([[["1", "2", "3"], ["1", "2", "0"]]] * 2)
    scorer = CiderD(df)
    full = np.array([[1, 2, 3]])
    wide = np.array([[1, 2, 3, 0, 0, 0]])
    a = scorer.score_token_ids(np.array([[1, 2, 3], [1, 2, 3]]), [full, wide])
    assert a[0] == pytest.approx(a[1], abs=1e-12)


def test_bad_inputs_raise():
    df = training_df(10)
    with pytest.raises(SaticError, match="different images"):
        CiderD(df).compute_score({1: ["a"]}, {2: ["a"]})
    with pytest.raises(SaticError, match="exactly one candidate"):
        Cider().compute_score({1: ["a"]}, {1: ["a", "b"]})
    with pytest.raises(SaticError, match="image 2: expected exactly one candidate"):  # the image at fault is named
        Cider().compute_score({1: ["a"], 2: ["a"]}, {1: ["a"], 2: ["a", "b"]})
    with pytest.raises(SaticError, match="image 2: expected a non-empty list of reference strings"):
        Cider().compute_score({1: ["a", "b"], 2: ["a", 3]}, {1: ["a"], 2: ["a"]})
    with pytest.raises(SaticError, match="image 1: expected a non-empty list"):
        Cider().compute_score({1: []}, {1: ["a"]})
    with pytest.raises(SaticError, match="evenly"):
        CiderD(df).score_token_ids(np.zeros((3, 4), int), [np.ones((2, 4), int)] * 2)
    with pytest.raises(SaticError, match="candidates: expected a 2-d integer array, got shape"):
        CiderD(df).score_token_ids(np.ones(4, int), [np.ones((2, 4), int)] * 2)
    with pytest.raises(SaticError, match=">= 0"):
        CiderD(df).score_token_ids(-np.ones((2, 4), int), [np.ones((2, 4), int)] * 2)
    with pytest.raises(SaticError, match=r"image_index must give one image in 0\.\.1 per candidate"):
        CiderD(df).score_token_ids(np.ones((2, 4), int), [np.ones((2, 4), int)] * 2, image_index=[0, 2])


def test_all_empty_captions_score_zero():
    """The toolkit crashes on a corpus without any word (max() of no frequencies); we score 0."""
    gts, res = {1: [""], 2: ["", ""]}, {1: [""], 2: [""]}
    assert Cider().compute_score(gts, res)[1].tolist() == [0.0, 0.0]
    df = DocumentFrequency.from_references([[[]], [[]]])
    assert len(df) == 0
    assert CiderD(df).compute_score(gts, res)[1].tolist() == [0.0, 0.0]
    ended = np.zeros((2, 3), dtype=int)  # both just the end token: unigram "0" matches, nothing else
    assert CiderD(df).score_token_ids(ended, [ended[:1], ended[:1]]).tolist() == [2.5, 2.5]


@pytest.mark.parametrize("n, sigma", [(1, 6.0), (2, 6.0), (3, 2.0), (4, 3.0)])
def test_cider_other_orders_and_sigmas_equal_a_per_pair_scorer(n, sigma):
    """The score is the mean over the n orders used (not a sum over 4), and sigma reaches the length penalty.
    (The toolkit's CiderScorer(n < 4) crashes: it always cooks 4-grams.) Corpus mode: df and ref_len from
    the references scored."""
    gts, res = real_corpus(60)
    for case, (hyp, refs) in EDGE_CASES.items():
        gts[case], res[case] = refs, hyp
    df = DocumentFrequency.from_references([[c.split() for c in refs] for refs in gts.values()])
    reference = PerPairCiderD(dict(df.items()), len(gts), sigma=sigma, n=n)
    mean, scores = Cider(n=n, sigma=sigma).compute_score(gts, res)
    expected = [reference.score(res[i][0], gts[i]) for i in gts]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert mean == pytest.approx(np.mean(expected), abs=1e-9)
    _, d_scores = CiderD(df, n=n, sigma=sigma).compute_score(gts, res)
    np.testing.assert_allclose(d_scores, expected, rtol=0, atol=1e-9)
    if n == 4:
        np.testing.assert_allclose(scores, ToolkitCider(sigma=sigma).compute_score(gts, res)[1], rtol=0, atol=1e-9)


def test_token_ids_match_only_the_df_words_that_spell_them():
    """Token 7 is the df word "7", never "07": the reference's array_to_str writes "7", and a df word "07" is
    another word. Token scores equal the scores of the same captions as text."""
    df = DocumentFrequency.from_references([[["07", "5", "0"]], [["07", "0"]], [["5", "0"]]])
    scorer = CiderD(df)
    cands, refs = np.array([[7, 5, 0], [7, 0, 0]]), [np.array([[7, 5, 0]]), np.array([[5, 7, 0]])]
    gts = {0: ["7 5 0"], 1: ["5 7 0"]}
    _, expected = scorer.compute_score(gts, {0: ["7 5 0"], 1: ["7 0"]})
    np.testing.assert_allclose(scorer.score_token_ids(cands, refs), expected, rtol=0, atol=1e-12)
    assert expected[0] > 0
    # several tokens the df does not know (each its own new word), and rows of one position
    cands, refs = np.array([[9, 7, 5, 11], [11, 9, 0, 0]]), [np.array([[7, 9, 5, 0]]), np.array([[5, 11, 0, 0]])]
    _, expected = scorer.compute_score({0: ["7 9 5 0"], 1: ["5 11 0"]}, {0: ["9 7 5 11"], 1: ["11 9 0"]})
    np.testing.assert_allclose(scorer.score_token_ids(cands, refs), expected, rtol=0, atol=1e-12)
    _, expected = scorer.compute_score({0: ["7"], 1: ["0"]}, {0: ["7"], 1: ["0"]})
    np.testing.assert_allclose(scorer.score_token_ids(np.array([[7], [0]]), [np.array([[7]]), np.array([[0]])]),
                               expected, rtol=0, atol=1e-12)


def test_df_words_of_other_digits_or_of_thousands_of_digits_spell_no_token():
    """"²" and "٣" are digits to str.isdigit, and a word of 5000 digits is more than int() reads: each is a word no
    token spells (as "07"), not a ValueError when the scorer is made."""
    df = DocumentFrequency.from_references([[["²", "5", "0"]], [["٣", "9" * 5000, "0"]], [["5", "0"]]])
    scorer = CiderD(df)
    _, expected = scorer.compute_score({0: ["5 0"], 1: ["3 0"]}, {0: ["5 0"], 1: ["3 0"]})
    scores = scorer.score_token_ids(np.array([[5, 0], [3, 0]]), [np.array([[5, 0]]), np.array([[3, 0]])])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)


def test_more_words_than_an_ngram_key_holds_are_refused():
    """Word ids above 65534 would wrap into the next digit of a packed n-gram and match other n-grams."""
    words = " ".join(f"w{i}" for i in range(65535))  # and "a": one word too many
    with pytest.raises(SaticError, match="the captions being scored has 65536 distinct words"):
        Cider().compute_score({1: [words], 2: ["a"]}, {1: ["a"], 2: ["a"]})
    with pytest.raises(SaticError, match=r"document frequencies plus new tokens has \d+ distinct words"):
        CiderD(training_df(10)).score_token_ids(np.arange(65536)[None] + 1, [np.ones((1, 3), int)])


def test_token_ids_do_not_copy_the_document_frequencies():
    """A reward looks its n-grams up in the training table, which holds millions of n-grams at COCO's size: a copy
    of the table per call would cost more than the reward itself. A table with a million more n-grams that no caption
    has gives the same rewards, with no allocation as large as the table."""
    vocab = {}
    train, _ = real_corpus(200, offset=3)
    small = DocumentFrequency.from_references([[array_to_str(r).split() for r in encode(refs, vocab)]
                                               for refs in train.values()])
    i = np.arange(1_000_000)
    unseen = ngrams.pack(np.stack([i // 1000, i % 1000, i % 7, i % 5], axis=1) + 5000)  # (1M,) 4-grams of new words
    keys = np.concatenate([small.keys, unseen])
    order = np.argsort(keys, kind="stable")
    counts = np.concatenate([small.counts, np.ones(len(unseen), np.int64)])
    big = DocumentFrequency(small.words, keys[order], counts[order], small.num_ref_sets)
    gts, res = real_corpus(10, offset=5)
    references = [encode(gts[k], vocab) for k in gts]
    candidates = np.concatenate([encode(res[k], vocab) for k in gts])
    expected = CiderD(small).score_token_ids(candidates, references)
    scorer = CiderD(big)
    tracemalloc.start()
    try:
        rewards = scorer.score_token_ids(candidates, references)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(rewards, expected)
    assert peak < big.counts.nbytes / 4


def test_scorers_name_their_metric_as_the_toolkit_does():
    assert Cider().method() == ToolkitCider().method() == "CIDEr"
    assert CiderD(training_df(10)).method() == "CIDEr-D"


@pytest.mark.parametrize("n", [0, 5])
def test_ngram_orders_outside_one_to_four_are_refused(n):
    with pytest.raises(SaticError, match=f"CIDEr n-gram order must be 1..4, got {n}"):
        Cider(n=n)
    with pytest.raises(SaticError, match=f"CIDEr-D n-gram order must be 1..4, got {n}"):
        CiderD(training_df(10), n=n)


def test_captions_given_as_bare_strings_are_refused():
    """A bare string is a sequence of one-character strings: it must not be scored as a caption of letters."""
    with pytest.raises(SaticError, match="image 0: expected a non-empty list of reference strings, got 'a cat'"):
        Cider().compute_score({0: "a cat", 1: ["a dog"]}, {0: ["a cat"], 1: ["a dog"]})
    with pytest.raises(SaticError, match="image 0: expected exactly one candidate caption string, got 'a'"):
        Cider().compute_score({0: ["a cat"], 1: ["a dog"]}, {0: "a", 1: ["a dog"]})


def test_missing_images_are_named_up_to_five_per_side():
    gts = {i: ["a dog"] for i in range(7)}
    res = {i: ["a dog"] for i in range(13, 20)}
    with pytest.raises(SaticError) as err:
        Cider().compute_score(gts, res)
    assert str(err.value) == ("results and references cover different images (no result for ['0', '1', '2', '3', '4'], "
                              "no references for ['13', '14', '15', '16', '17'])")


def test_corpus_scores_with_default_order_and_sigma_equal_the_toolkit():
    """cider_scores' defaults are the toolkit's n = 4 and sigma = 6 (lengths differ here, so sigma matters)."""
    gts, res = real_corpus(30)
    _, refs = zip(*sorted(gts.items()))
    hyps = [res[k][0] for k in sorted(gts)]
    scores = cider_scores(text_rows(hyps, refs, {}), None)
    np.testing.assert_allclose(scores, ToolkitCider().compute_score(gts, res)[1], rtol=0, atol=1e-9)


def test_reference_sets_and_positions_within_them():
    ref_set, ref_slot = sets_and_slots([2, 3, 1])
    assert ref_set.tolist() == [0, 0, 1, 1, 1, 2]
    assert ref_slot.tolist() == [0, 1, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="grouped by set"):
        empty = np.zeros(0, np.int64)
        CaptionRows(empty, empty, empty, empty, np.zeros(3, np.int64), np.array([0, 1, 0]), np.array([0, 0, 1]), 2)


def test_token_ids_reject_float_arrays_and_missing_references():
    df = training_df(10)
    with pytest.raises(SaticError, match="candidates: expected a 2-d integer array, got shape .2, 4. dtype float64"):
        CiderD(df).score_token_ids(np.ones((2, 4)), [np.ones((2, 4), int)] * 2)
    with pytest.raises(SaticError, match="every image needs at least one reference caption"):
        CiderD(df).score_token_ids(np.ones((2, 4), int), [np.ones((2, 4), int), np.zeros((0, 4), int)])
    with pytest.raises(SaticError, match="every image needs at least one reference caption"):
        CiderD(df).score_token_ids(np.zeros((0, 4), int), [])
    with pytest.raises(SaticError, match=r"image_index must give one image in 0\.\.1 per candidate"):
        CiderD(df).score_token_ids(np.ones((2, 4), int), [np.ones((2, 4), int)] * 2, image_index=[0])


def test_token_ids_of_no_candidates_or_no_positions():
    """No candidates (image_index an empty list, as a filtered batch gives) score to an empty array; candidates of
    width 0 are empty captions and score 0."""
    df = DocumentFrequency.from_references([[["1", "2", "0"]], [["2", "0"]]])
    refs = [np.array([[1, 2, 0]]), np.array([[2, 0, 0]])]
    for index in ([], np.zeros(0, np.int64), None):
        assert CiderD(df).score_token_ids(np.zeros((0, 4), int), refs, image_index=index).shape == (0,)
    assert CiderD(df).score_token_ids(np.zeros((2, 0), int), refs).tolist() == [0.0, 0.0]


def test_tokens_below_the_largest_numeric_df_word_but_not_in_the_df_are_new_words():
    """Token 3 is no df word, though the df has the larger word "5": it must not match any df word (such as "5",
    word 1 of the table)."""
    df = DocumentFrequency.from_references([[["0", "5"]], [["1"]]])
    scorer = CiderD(df)
    rewards = scorer.score_token_ids(np.array([[3, 0], [5, 0]]), [np.array([[5, 0]])] * 2)
    _, expected = scorer.compute_score({0: ["5 0"], 1: ["5 0"]}, {0: ["3 0"], 1: ["5 0"]})
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=1e-12)
    assert rewards[0] < rewards[1]
