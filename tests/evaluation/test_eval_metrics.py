"""The coco-caption wrappers: toolkit numbers, the Python tokenizer, and the paths without Java."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu as ToolkitBleu
from pycocoevalcap.cider.cider import Cider as ToolkitCider
from pycocoevalcap.rouge.rouge import Rouge as ToolkitRouge

from satic.errors import SaticError
from satic.evaluation import coco_metrics
from satic.evaluation.metrics import (SPICE_JARS_ENV, Meteor, java_available, simple_tokenize,
                                      spice_unavailable_reason, tokenize)
from processes import AS_NOBODY, nobody_runs_satic
from test_eval_cider import real_corpus

needs_java = pytest.mark.skipif(not java_available(),
                                reason="Java not installed (apt-get install default-jre-headless)")

TRICKY = ["A man's dog, running on the beach.", "Two people -- near a black-and-white (old) car!", "",
          "It can't be 3.5 feet tall; \"really\"?", "  the   DOG's  ball... is red", "a 'quoted' word and end-",
          "mother-in-law isn't here: o'clock", "U.S. flag at 10:30 a.m.", "kids' toys, and the dogs' bowls.",
          "A [big] {red} sign!!", "it's 5 p.m. now."]


def toolkit_scores(gts, res):
    bleu, bleu_per = ToolkitBleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": (bleu[n], bleu_per[n]) for n in range(4)}
    scores["ROUGE_L"] = ToolkitRouge().compute_score(gts, res)
    scores["CIDEr"] = ToolkitCider().compute_score(gts, res)
    return scores


def java_children():
    """Java processes started by this test process (to check METEOR was shut down)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(os.getpid()) and fields.get("Name", "").strip() == "java":
            found.append(status.parent.name)
    return found


@needs_java
def test_simple_tokenizer_matches_ptb():
    gts, _ = real_corpus(60)
    captions = [c for refs in gts.values() for c in refs] + TRICKY
    ptb = tokenize({i: [c] for i, c in enumerate(captions)})
    assert [simple_tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


@needs_java
def test_tokenize_is_the_toolkits_ptb_tokenizer_and_writes_nothing_inside_it():
    """The toolkit's own tokenizer writes (and removes) its input file beside its jar, inside the installed
    package, which changes that folder's modification time; a user who did not install it cannot write there.
    (One test: the toolkit's tokenizer, run for the comparison, must not run meanwhile.)"""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from satic.evaluation.metrics import PTB_JAR

    gts, _ = real_corpus(30)
    captions = {i: refs for i, refs in enumerate(list(gts.values()) + [TRICKY])}
    before = PTB_JAR.parent.stat().st_mtime_ns
    time.sleep(0.01)
    ours = tokenize(captions)
    assert PTB_JAR.parent.stat().st_mtime_ns == before
    if not os.access(PTB_JAR.parent, os.W_OK):  # a toolkit installed by another user: its own run would fail
        pytest.skip(f"the toolkit's own tokenizer cannot write into {PTB_JAR.parent}, so it cannot be compared here")
    toolkit = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs] for i, refs in captions.items()})
    assert ours == toolkit


@needs_java
@pytest.mark.skipif(not nobody_runs_satic(), reason="needs root, setpriv and a checkout other users can read")
def test_a_user_who_cannot_write_the_toolkit_can_tokenize(tmp_path):
    script = "from satic.evaluation.metrics import tokenize; print(tokenize({1: ['A dog, running.']}))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HOME=str(tmp_path))
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 0 and done.stdout == "{1: ['a dog running']}\n", done.stderr[-2000:]


@needs_java
def test_the_java_tokenizer_writes_nothing_to_stderr_unless_it_fails(capfd, monkeypatch):
    """Its line on its speed would break the progress bar at every validation of a training run."""
    from satic.evaluation import metrics

    assert tokenize({1: ["A dog, running."], 2: ["Two cats"]}) == {1: ["a dog running"], 2: ["two cats"]}
    assert capfd.readouterr().err == ""
    monkeypatch.setattr(metrics, "PTB_JAR", metrics.PTB_JAR.with_name("missing.jar"))  # java fails and says why
    for captions in ({1: ["A dog."]}, {1: ["A dog.", "a cat"], 2: ["two cats", ""]}):
        with pytest.raises(SaticError, match=r"PTB tokenizer \(Java\) failed: .*PTBTokenizer.*java -version"):
            tokenize(captions)
    monkeypatch.undo()
    # captions without words tokenize to nothing, which is no failure
    assert tokenize({1: ["A dog.", "..."], 2: [""]}) == {1: ["a dog", ""], 2: [""]}
    assert capfd.readouterr().err == ""


@needs_java
def test_coco_metrics_equal_toolkit_and_close_meteor(caplog):
    gts, res = real_corpus(12)
    gts["same"], res["same"] = ["A dog runs on the grass."], ["a dog runs on the grass"]
    with caplog.at_level(logging.WARNING):
        overall, per_image = coco_metrics(gts, res, spice=True)
    assert list(overall) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "bad_count_rate"]
    gts_tok, res_tok = tokenize(gts), tokenize(res)
    for name, (score, scores) in toolkit_scores(gts_tok, res_tok).items():
        assert overall[name] == pytest.approx(score, abs=1e-9), name
        np.testing.assert_allclose([per_image[i][name] for i in gts], scores, rtol=0, atol=1e-9)
    assert 0 < overall["METEOR"] < 1
    assert per_image["same"]["METEOR"] > 0.9 > per_image[0]["METEOR"]
    assert per_image["same"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert "SPICE skipped" in caplog.text and SPICE_JARS_ENV in caplog.text
    assert java_children() == []


def test_bad_count_rate_is_the_references(monkeypatch, tmp_path):
    """eval_utils.py's count_bad: the last space-separated word of the caption as written, against its own
    list (which has 'is', 'near', 'before', ... beside remove_bad_endings' words)."""
    from satic.evaluation.metrics import bad_count_rate

    captions = ["a dog on a", "a dog is", "a cat", "the man near", "a man with his", "a bus .", ""]
    assert bad_count_rate(captions) == 3 / 7
    monkeypatch.setenv("PATH", str(tmp_path))  # the Java-free path is enough here
    gts = {i: ["a reference caption"] for i in range(4)}
    overall, _ = coco_metrics(gts, {i: [c] for i, c in enumerate(captions[:4])})
    assert overall["bad_count_rate"] == 0.75


def test_coco_metrics_without_java(monkeypatch, tmp_path, caplog):
    """Without Java: the other metrics, and each warning once per process (a training run scores every
    validation)."""
    from satic.evaluation import metrics

    monkeypatch.setattr(metrics, "_SAID", set())  # as in a new process
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    assert not java_available()
    gts, res = real_corpus(10)
    gts[99], res[99] = TRICKY[:3], [TRICKY[3]]
    with caplog.at_level(logging.WARNING):
        overall, per_image = coco_metrics(gts, res, spice=True)
        coco_metrics(gts, res, spice=True)
    assert list(overall) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "bad_count_rate"]
    assert "default-jre-headless" in caplog.text and "SPICE skipped: Java" in caplog.text
    assert caplog.text.count("Java not found") == 1 and caplog.text.count("SPICE skipped") == 1
    gts_tok = {k: [simple_tokenize(c) for c in v] for k, v in gts.items()}
    res_tok = {k: [simple_tokenize(c) for c in v] for k, v in res.items()}
    for name, (score, _) in toolkit_scores(gts_tok, res_tok).items():
        assert overall[name] == pytest.approx(score, abs=1e-9), name
    with pytest.raises(SaticError, match="default-jre-headless"):
        Meteor().compute_score({1: ["a"]}, {1: ["a"]})


def test_spice_reason_names_the_jar_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(SPICE_JARS_ENV, str(tmp_path))  # exists but holds no jars
    reason = spice_unavailable_reason()
    if java_available():
        assert "stanford-corenlp-3.6.0.jar" in reason and SPICE_JARS_ENV in reason
    else:
        assert "Java" in reason


def test_bad_count_rate_splits_on_single_spaces_as_the_reference():
    """count_bad's caption.split(' '): a caption ending in a space ends in an empty word, one with a tab or a
    newline before its last word has that whole run as its last word; neither counts as a bad ending."""
    from satic.evaluation.metrics import bad_count_rate

    assert bad_count_rate(["a dog on ", "a man\twith", "a cat\non"]) == 0.0
    assert bad_count_rate(["a dog on", "a man with"]) == 1.0


# captions with what PTB splits, joins or keeps beyond plain words, and its tokens for them (from the toolkit's jar)
PTB_TOKENS = [
    ("A man on Main St. with his dog", "a man on main st. with his dog"),
    ("Mr. Smith's bike costs $5, 50% off!", "mr. smith 's bike costs $ 5 50 % off"),
    ("the #1 cat-like e-mail w/ a.m. x=y <3", "the # 1 cat-like e-mail w / a.m. x = y < 3"),
    ("It\u2019s a \u201cnice\u201d day\u2014isn\u2019t it\u2026", "it 's a nice day is n't it"),
    ("You cannot go; gonna wanna gotta", "you can not go gon na wan na got ta"),
    ("What?! Really?!", "what ?! really ?!"),
    ("rock'n'roll in the '70s, 'cause y'all at 5:00pm for 1.5m",
     "rock 'n' roll in the '70s 'cause y' all at 5:00 pm for 1.5 m"),
    ("a 6'2 man, 5'10 woman, 1 9/11 of a pie", "a 6 2 man 5 '10 woman 1\xa09/11 of a pie"),
    ("AT&T &amp; R&B at&t &AMP;", "at&t & r&b at & t &"),
    ("c++ and a+b and a*b", "c++ and a + b and a * b"),
    ("etc. vs. Inc.", "etc. vs. inc."),
    ("no--yes", "no yes"),
    ("bus No. 5, no.7 and pp. 12; the no. x, No.  12", "bus no. 5 no. 7 and pp. 12 the no x no 12"),
    ("a wanna-be chef, a cannot-miss deal, lemna and gotme; +5 and 1+1; Billy'all",
     "a wanna-be chef a cannot-miss deal lemna and gotme +5 and 1 +1 billy'all"),
]


@pytest.mark.parametrize("caption, tokens", PTB_TOKENS, ids=[c for c, _ in PTB_TOKENS])
def test_simple_tokenizer_gives_ptbs_tokens_for_symbols_quotes_and_abbreviations(caption, tokens):
    assert simple_tokenize(caption) == tokens


@needs_java
def test_ptb_still_gives_those_tokens():
    ptb = tokenize({i: [caption] for i, (caption, _) in enumerate(PTB_TOKENS)})
    assert [ptb[i][0] for i in range(len(PTB_TOKENS))] == [tokens for _, tokens in PTB_TOKENS]


def test_simple_tokenizer_splits_leading_hyphens_off_as_ptb():
    """PTB's tokens for these (checked against the Java tokenizer): a leading hyphen or quote is punctuation."""
    captions = ["a -big dog", "-a cat", "x '-tail", "--dash start"]
    assert [simple_tokenize(c) for c in captions] == ["a big dog", "a cat", "x tail", "dash start"]


@needs_java
def test_tokenize_keeps_an_image_without_captions_and_a_caption_with_a_line_break_whole():
    assert tokenize({1: ["A dog."], 2: [], 3: ["Two cats"]}) == {1: ["a dog"], 2: [], 3: ["two cats"]}
    assert tokenize({1: ["A dog\nrunning."], 2: ["Two cats"]}) == {1: ["a dog running"], 2: ["two cats"]}


def test_bad_count_rate_counts_every_ending_of_the_references_list():
    """eval_utils.py's bad_endings, every one of them."""
    from satic.evaluation.metrics import bad_count_rate

    endings = ["a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near", "to", "is",
               "are", "am"]
    assert bad_count_rate([f"a dog {word}" for word in endings]) == 1.0
    assert bad_count_rate(["a dog this", "a dog his"]) == 0.0  # remove_bad_endings' words that count_bad lacks


def test_format_table_gives_four_decimals_and_the_x100_figure():
    from satic.evaluation.metrics import format_table

    overall = {"CIDEr": 1.234567, "Bleu_4": 0.30001, "bad_count_rate": 0.25, "not_a_metric": 3.0}
    assert format_table(overall, 12).splitlines() == ["metric           value   x100",
                                                      "--------------  ------  -----",
                                                      "Bleu_4          0.3000   30.0",
                                                      "CIDEr           1.2346  123.5",
                                                      "bad_count_rate  0.2500   25.0",
                                                      "(12 images)"]
    assert format_table(overall).splitlines()[-1] == "bad_count_rate  0.2500   25.0"


def test_bleu_defaults_to_bleu_1_to_4():
    from satic.evaluation.metrics import Bleu

    means, per_image = Bleu().compute_score({1: ["a dog runs on the grass"]}, {1: ["a dog runs on the grass"]})
    assert means == pytest.approx([1.0] * 4) and len(per_image) == 4


def test_spice_jars_are_taken_from_the_folder_the_environment_names(monkeypatch, tmp_path):
    from satic.evaluation.metrics import CORENLP_JARS, spice_jar_dir

    monkeypatch.setenv(SPICE_JARS_ENV, str(tmp_path))
    (tmp_path / CORENLP_JARS[0]).write_bytes(b"")
    assert spice_jar_dir() != tmp_path  # one of the two jars is not enough
    (tmp_path / CORENLP_JARS[1]).write_bytes(b"")
    assert spice_jar_dir() == tmp_path
