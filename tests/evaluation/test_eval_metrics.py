"""The coco-caption wrappers: toolkit numbers, the Python tokenizer, and the paths without Java."""
import json
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
from processes import AS_NOBODY, default_sigint, finish, nobody_runs_satic, traced_env
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

    descriptors = sorted(os.listdir("/proc/self/fd"))
    assert tokenize({1: ["A dog, running."], 2: ["Two cats"]}) == {1: ["a dog running"], 2: ["two cats"]}
    assert capfd.readouterr().err == ""
    os.write(2, b"written after it\n")  # stderr is given back, and no descriptor is left open
    assert capfd.readouterr().err == "written after it\n" and sorted(os.listdir("/proc/self/fd")) == descriptors
    monkeypatch.setattr(metrics, "PTB_JAR", metrics.PTB_JAR.with_name("missing.jar"))  # java fails and says why
    for captions in ({1: ["A dog."]}, {1: ["A dog."], 2: ["a cat"]}, {1: ["A dog.", "a cat"], 2: ["two cats", ""]}):
        with pytest.raises(SaticError, match=r"PTB tokenizer \(Java\) failed: .*PTBTokenizer.*java -version"):
            tokenize(captions)
    monkeypatch.undo()
    # captions without words tokenize to nothing, which is no failure
    assert tokenize({1: ["A dog.", "..."], 2: [""]}) == {1: ["a dog", ""], 2: [""]}
    assert tokenize({1: ["..."], 2: ["", "!"]}) == {1: [""], 2: ["", ""]}
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


@needs_java
def test_ctrl_c_while_meteor_scores_ends_the_command_and_its_java_process(tmp_path):
    """A real SIGINT while the toolkit's METEOR scores a caption (its lock held): `satic score` ends with one line and
    status 130, promptly, with its Java process gone, instead of hanging as the toolkit's object is collected."""
    references = {"images": [{"id": i} for i in range(3)],
                  "annotations": [{"image_id": i, "id": i, "caption": "a dog runs on the grass"} for i in range(3)]}
    (tmp_path / "refs.json").write_text(json.dumps(references))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": "a dog on grass"} for i in range(3)]))
    program = ("import signal, sys\n"
               "from pycocoevalcap.meteor import meteor\n"
               "stat = meteor.Meteor._stat\n"
               "def interrupted(self, *args):\n"
               "    print(self.meteor_p.pid, flush=True)\n"
               "    signal.raise_signal(signal.SIGINT)\n"
               "    return stat(self, *args)\n"
               "meteor.Meteor._stat = interrupted\n"
               "from satic.__main__ import run; sys.exit(run())")
    child = subprocess.Popen([sys.executable, "-c", program, "score", "--results", str(tmp_path / "res.json"),
                              "--references", str(tmp_path / "refs.json")], env=traced_env(OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    out, err = finish(child, 60)
    assert (child.returncode, err.decode().splitlines()[-1:]) == (130, ["satic score: interrupted"]), err.decode()
    assert "Traceback" not in err.decode()
    assert not Path(f"/proc/{int(out)}").exists()  # the Java process was stopped and reaped


def test_bad_count_rate_is_the_references(monkeypatch, tmp_path):
    """eval_utils.py's count_bad: the last space-separated word of the caption as written, against its own
    list (which has 'is', 'near', 'before', ... beside remove_bad_endings' words)."""
    from satic.evaluation.metrics import bad_count_rate

    captions = ["a dog on a", "a dog is", "a cat", "the man near", "a man with his", "a bus .", ""]
    assert bad_count_rate(captions) == 3 / 7
    assert bad_count_rate([]) == 0.0
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
    ("the 9/11 memorial and 3 1/2 cups", "the 9/11 memorial and 3\xa01/2 cups"),
    ("cats and/or dogs/?!", "cats and/or dogs / ?!"),
    ("the U.S., then Main St, and Dr!", "the u.s. then main st and dr"),
    ("A dog on grass.. the St.. and the U.S.., 10.. e.g.. end..... ok..",
     "a dog on grass the st. and the u.s. 10 e.g. end ok"),
    ('He asked "why?" and left, stop!, he said', "he asked why and left stop he said"),
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


@needs_java
@pytest.mark.parametrize("line_break", ["\r", "\r\n", "\v", "\f", "\u2028", "\u2029"])
def test_a_caption_with_any_line_break_the_ptb_tokenizer_takes_is_tokenized_whole(line_break):
    """The tokenizer reads one caption a line: a line break inside a caption would give every later image the
    tokens of the caption before its own."""
    assert tokenize({1: [f"A dog{line_break}running."], 2: ["Two cats"]}) == {1: ["a dog running"], 2: ["two cats"]}


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


def test_bleu_defaults_to_bleu_1_to_4(capsys):
    from satic.evaluation.metrics import Bleu

    means, per_image = Bleu().compute_score({1: ["a dog runs on the grass"]}, {1: ["a dog runs on the grass"]})
    assert means == pytest.approx([1.0] * 4) and len(per_image) == 4
    assert capsys.readouterr().out == ""  # the toolkit's lengths and ratio are not printed


def test_spice_jars_are_taken_from_the_folder_the_environment_names(monkeypatch, tmp_path):
    from satic.evaluation.metrics import CORENLP_JARS, spice_jar_dir

    monkeypatch.setenv(SPICE_JARS_ENV, str(tmp_path))
    (tmp_path / CORENLP_JARS[0]).write_bytes(b"")
    assert spice_jar_dir() != tmp_path  # one of the two jars is not enough
    (tmp_path / CORENLP_JARS[1]).write_bytes(b"")
    assert spice_jar_dir() == tmp_path


# Stands in for `java` when SPICE runs: the SpiceScorer's output file for its input file (F-score: the candidate's
# word count / 10, none for an empty candidate), listed in reverse order; the call and its input are written to
# $SPICE_CALL.
FAKE_SPICE_JAVA = """#!{python}
import json, os, sys
args = sys.argv[1:]
items = json.load(open(args[args.index("edu.anu.spice.SpiceScorer") + 1]))
with open(os.environ["SPICE_CALL"], "w") as f:
    json.dump({{"args": args, "cwd": os.getcwd(), "items": items}}, f)
if os.environ.get("SPICE_FAILS"):
    sys.stderr.write("Exception in thread main:" + " at" * 200 + " out of memory\\n")
    sys.exit(3)
scores = [{{"image_id": item["image_id"], "scores": {{"All": {{"f": len(item["test"].split()) / 10 or None}}}}}}
          for item in items]
with open(args[args.index("-out") + 1], "w") as f:
    json.dump(scores[::-1], f)
"""


@pytest.fixture()
def spice_java(monkeypatch, tmp_path):
    """A `java` for SPICE alone on PATH, and the CoreNLP jars (empty files) in $SATIC_SPICE_JARS; -> jar folder."""
    from satic.evaluation.metrics import CORENLP_JARS

    bin_dir, jars = tmp_path / "bin", tmp_path / "jars"
    bin_dir.mkdir(), jars.mkdir()
    (bin_dir / "java").write_text(FAKE_SPICE_JAVA.format(python=sys.executable))
    (bin_dir / "java").chmod(0o755)
    for jar in CORENLP_JARS:
        (jars / jar).write_bytes(b"")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv(SPICE_JARS_ENV, str(jars))
    monkeypatch.setenv("SPICE_CALL", str(tmp_path / "call.json"))
    return jars


def test_spice_runs_its_jar_with_the_corenlp_jars_and_reads_the_all_f_scores(spice_java, tmp_path):
    """Per-image scores in the order of gts whatever order the jar lists them in, NaN where it gives none, and
    their mean over the others."""
    from satic.evaluation.metrics import TOOLKIT, Spice, spice_jar_dir

    assert java_available() and spice_jar_dir() == spice_java and spice_unavailable_reason() is None
    gts = {"b": ["a dog runs", "the dog"], 7: ["two cats"], "c": ["a bus"]}
    res = {"b": ["a brown dog"], 7: [""], "c": ["a red bus on a road"]}
    mean, scores = Spice().compute_score(gts, res)
    np.testing.assert_array_equal(scores, [0.3, np.nan, 0.6])
    assert mean == pytest.approx(0.45)
    call = json.loads((tmp_path / "call.json").read_text())
    spice_dir = TOOLKIT / "spice"
    assert call["cwd"] == str(spice_dir)
    assert call["items"] == [{"image_id": 0, "test": "a brown dog", "refs": ["a dog runs", "the dog"]},
                             {"image_id": 1, "test": "", "refs": ["two cats"]},
                             {"image_id": 2, "test": "a red bus on a road", "refs": ["a bus"]}]
    assert call["args"][:4] == ["-Xmx8G", "-cp", os.pathsep.join([str(spice_dir / "spice-1.0.jar"),
                                                                  str(spice_dir / "lib" / "*"), str(spice_java / "*")]),
                                "edu.anu.spice.SpiceScorer"]
    assert call["args"][5:] == ["-out", str(Path(call["args"][4]).with_name("out.json")), "-subset", "-silent"]
    assert not Path(call["args"][4]).parent.exists()  # its files are removed
    mean, scores = Spice().compute_score({}, {})
    assert scores.shape == (0,) and np.isnan(mean)


def test_spice_that_fails_is_an_error_with_what_java_said(spice_java, monkeypatch):
    from satic.evaluation.metrics import Spice

    monkeypatch.setenv("SPICE_FAILS", "1")
    with pytest.raises(SaticError) as failed:
        Spice().compute_score({1: ["a dog"]}, {1: ["a dog"]})
    said = ("Exception in thread main:" + " at" * 200 + " out of memory")[-500:]  # the end of a long message
    assert str(failed.value) == f"SPICE failed (exit 3): {said}"


def test_spice_is_refused_with_the_reason_it_cannot_run(monkeypatch, tmp_path):
    from satic.evaluation.metrics import Spice

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SaticError, match=r"^SPICE skipped: Java is not on PATH \(install Java"):
        Spice().compute_score({1: ["a dog"]}, {1: ["a dog"]})


def test_format_table_lists_every_metric_in_the_papers_order():
    from satic.evaluation.metrics import format_table

    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "bad_count_rate"]
    overall = {name: (i + 1) / 10 for i, name in enumerate(names)}
    rows = format_table(dict(reversed(overall.items()))).splitlines()[2:]
    assert [row.split() for row in rows] == [[name, f"{value:.4f}", f"{value * 100:.1f}"]
                                             for name, value in overall.items()]


def test_spice_jars_are_looked_for_in_the_toolkit_without_the_environment(monkeypatch, tmp_path):
    from satic.evaluation import metrics

    monkeypatch.delenv(SPICE_JARS_ENV, raising=False)
    monkeypatch.setattr(metrics, "TOOLKIT", tmp_path)
    lib = tmp_path / "spice" / "lib"
    lib.mkdir(parents=True)
    assert metrics.spice_jar_dir() is None
    for jar in metrics.CORENLP_JARS:
        (lib / jar).write_bytes(b"")
    assert metrics.spice_jar_dir() == lib
    monkeypatch.setenv(SPICE_JARS_ENV, str(tmp_path / "empty"))  # a folder without them: the toolkit's are used
    assert metrics.spice_jar_dir() == lib


def test_coco_metrics_report_spice_where_it_can_run(monkeypatch, tmp_path):
    """SPICE, asked for and available, is scored on the tokenized captions of gts' images and reported overall
    and per image; not asked for, it is not run."""
    from satic.evaluation import metrics
    from satic.evaluation.metrics import coco_metrics_of_sets

    scored = []

    class Spice:
        def compute_score(self, gts, res):
            scored.append((gts, res))
            return 0.25, np.array([0.5, 0.0])

    monkeypatch.setenv("PATH", str(tmp_path))  # the Python tokenizer
    monkeypatch.setattr(metrics, "spice_unavailable_reason", lambda: None)
    monkeypatch.setattr(metrics, "Spice", Spice)
    gts, res = {"x": ["A dog runs."], 3: ["Two cats, sleeping"]}, {"x": ["a dog runs"], 3: ["a cat"]}
    overall, per_image = coco_metrics(gts, res, spice=True)
    assert list(overall)[-3:] == ["CIDEr", "SPICE", "bad_count_rate"] and overall["SPICE"] == 0.25
    assert (per_image["x"]["SPICE"], per_image[3]["SPICE"]) == (0.5, 0.0)
    assert scored == [({"x": ["a dog runs"], 3: ["two cats sleeping"]}, {"x": ["a dog runs"], 3: ["a cat"]})]
    assert "SPICE" not in coco_metrics(gts, res)[0] and len(scored) == 1
    assert "SPICE" not in coco_metrics_of_sets(gts, {"a": res})["a"][0] and len(scored) == 1


def test_every_result_set_must_cover_the_images_of_the_references(monkeypatch, tmp_path):
    """A set with an image more (or less) than gts is refused, not scored on gts' images alone."""
    from satic.evaluation.metrics import coco_metrics_of_sets

    monkeypatch.setenv("PATH", str(tmp_path))
    gts, res = {1: ["a dog runs"], 2: ["two cats"]}, {1: ["a dog"], 2: ["a cat"]}
    assert list(coco_metrics_of_sets(gts, {"a": res, "b": res})) == ["a", "b"]
    for other in ({**res, 3: ["a bus"]}, {1: ["a dog"]}):
        with pytest.raises(SaticError, match=r"^results and references cover different images"):
            coco_metrics_of_sets(gts, {"a": res, "b": other})


def test_each_scorer_is_named_as_the_metric_it_reports():
    """The names of the toolkit's results (Bleu_1..4 for BLEU), which METRIC_NAMES lists."""
    from satic.evaluation.metrics import METRIC_NAMES, Bleu, Rouge, Spice

    names = [scorer.method() for scorer in (Bleu(), Meteor(), Rouge(), Spice())]
    assert names == ["Bleu", "METEOR", "ROUGE_L", "SPICE"] and set(names[1:]) < set(METRIC_NAMES)


@pytest.mark.parametrize("scorer", ["Bleu", "Rouge", "Meteor", "Spice"])
def test_each_scorer_refuses_results_for_other_images_than_the_references(monkeypatch, tmp_path, scorer):
    from satic.evaluation import metrics

    monkeypatch.setenv("PATH", str(tmp_path))  # no Java: refused before it would be needed
    with pytest.raises(SaticError, match=r"cover different images \(no result for \['1'\], no references for \['2'\]"):
        getattr(metrics, scorer)().compute_score({1: ["a dog"]}, {2: ["a dog"]})


@pytest.mark.parametrize("end", ["close", "with", "collected"])
def test_meteor_stops_its_process_and_closes_its_pipes(end):
    """close(), the end of a `with` block and garbage collection each kill the toolkit's METEOR process (here a
    stand-in that would exit by itself, with status 0, a few seconds later), wait for it and close its pipes."""
    from types import SimpleNamespace

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if end == "close":
        meteor = Meteor()
        meteor._scorer = SimpleNamespace(meteor_p=process)
        meteor.close()
        assert meteor._scorer is None
        meteor.close()  # a second time: nothing left to stop
    elif end == "with":
        with Meteor() as meteor:
            meteor._scorer = SimpleNamespace(meteor_p=process)
    else:
        meteor = Meteor()
        meteor._scorer = SimpleNamespace(meteor_p=process)
        del meteor
    assert process.returncode == -9
    assert process.stdin.closed and process.stdout.closed and process.stderr.closed


def test_a_failed_java_tokenizer_is_named_with_the_end_of_what_it_said(monkeypatch, tmp_path):
    """Its lines joined by " / ", the last 300 characters of them, or "no output" when it said nothing."""
    lines = ["Error: could not start"] + [f"  at edu.stanford.nlp.process.PTBTokenizer.main({i})" for i in range(9)]
    for said, named in (("\n".join(lines), " / ".join(line.strip() for line in lines)[-300:]), ("", "no output")):
        (tmp_path / "java").write_text(f"#!/bin/sh\nprintf '{said}\\n' >&2\nexit 1\n")
        (tmp_path / "java").chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(SaticError) as failed:
            tokenize({1: ["A dog."]})
        assert str(failed.value).startswith(f"the COCO toolkit's PTB tokenizer (Java) failed: {named}; check `java")


def test_what_was_written_to_stderr_while_tokenizing_is_passed_on_when_it_stops(monkeypatch, tmp_path, capfd):
    """Ctrl-C while the PTB tokenizer runs: the interruption goes on, with the lines written meanwhile."""
    from satic.evaluation import metrics

    (tmp_path / "java").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "java").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))

    def interrupted(captions):
        os.write(2, b"PTBTokenizer tokenized 3 tokens\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "ptb_tokenize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize({1: ["A dog."]})
    assert capfd.readouterr().err == "PTBTokenizer tokenized 3 tokens\n"
