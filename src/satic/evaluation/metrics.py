"""The coco-caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) behind one interface.

Reported numbers must be the toolkit's, so BLEU, METEOR and ROUGE-L call pycocoevalcap and CIDEr
is our exact re-implementation. The toolkit needs Java for its PTB tokenizer, METEOR and SPICE;
without Java we tokenize in Python (same lower-casing and punctuation removal) and skip METEOR and
SPICE with one line each, so the other metrics are still reported. SPICE also needs the Stanford
CoreNLP 3.6.0 jars, which the toolkit downloads on first use: put them (stanford-corenlp-3.6.0.jar
and stanford-corenlp-3.6.0-models.jar) in the folder named by $SATIC_SPICE_JARS, or in the
toolkit's pycocoevalcap/spice/lib.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import pycocoevalcap.spice.spice as _toolkit_spice
from pycocoevalcap.bleu.bleu import Bleu as _ToolkitBleu
from pycocoevalcap.meteor.meteor import Meteor as _ToolkitMeteor
from pycocoevalcap.rouge.rouge import Rouge as _ToolkitRouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

from satic.errors import SaticError
from satic.evaluation.cider import Cider, check_captions
from satic.evaluation.report import text_table
from satic.io import deferred_interrupts

log = logging.getLogger(__name__)

TOOLKIT = Path(_toolkit_spice.__file__).resolve().parents[1]  # pycocoevalcap/ (a namespace package)
PTB_JAR = TOOLKIT / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
SPICE_JARS_ENV = "SATIC_SPICE_JARS"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
INSTALL_JAVA = "install Java, e.g. `apt-get install default-jre-headless`"


_SAID: set[str] = set()  # the warnings this process has given: a training run scores every validation


def warn_once(message: str) -> None:
    """Log a warning the first time this process meets it (README: without Java, satic says so once)."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)


def java_available() -> bool:
    return shutil.which("java") is not None


def require_java(metric: str) -> None:
    if not java_available():
        raise SaticError(f"{metric} needs Java, which is not on PATH; {INSTALL_JAVA}")


# ---------------------------------------------------------------- tokenization

_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_SUFFIXES = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_LEADING = "\"'`-"
_TRAILING = ".,;:!?\"'`-/"
# what the PTB tokenizer reads as one character, and the words it splits in two
_CHARACTERS = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ", "\u2013": " -- ",
               "\u2026": " ... ", "--": " -- "}
_LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]")  # each ends a line for the PTB tokenizer: one caption a line
_ENTITIES = re.compile(r"&(amp|lt|gt|quot);", re.IGNORECASE)
_ENTITY_CHARACTERS = {"amp": "&", "lt": "<", "gt": ">", "quot": '"'}
_SPLIT_WORDS = re.compile(r"(?<![\w-])(?:(can)(not)|(gon|wan)(na)|(got)(ta)|(lem|gim)(me))(?![\w-])")
# symbols it splits from the characters beside them ('+' only before a letter or digit: "c++" stays)
# (and '&' unless between capitals, as in AT&T: it splits the symbols before it lower-cases)
_SYMBOLS = re.compile(r"([$#%=<>*]|(?<![A-Z])&|&(?![A-Z])|\+(?=[^\W\d]))")
_SIGNED_NUMBER = re.compile(r"(?<=\w)(\+\d)")  # 1+1 -> 1 +1, but +5 stays one token
_NUMBER_UNIT = re.compile(r"\b(\d+[:.]\d+)([a-z]+)\b")  # 5:00pm, 1.5m (but 5pm stays)
_BETWEEN_DIGITS = re.compile(r"(?<=\d)'(?=\d)")  # 6'2 -> 6 '2 (then 6 2), 5'10 -> 5 '10
_FRACTION = re.compile(r"\d+/\d+")
# abbreviations whose period it keeps only before a number (no. 5, pp. 12; no.5 splits to no. 5)
_BEFORE_NUMBER = re.compile(r"\b(nos?|art|pp?)\. ?(?=\d)")
_KEPT_PERIOD = "\ue000"  # stands for such a period while the end punctuation is split off
_KEPT_APOSTROPHE = re.compile(r"'(cause|\d\ds?)$")  # 'cause, '70s, '10
_KEPT = {"'n'", "y'"}  # rock 'n' roll, y' all
_Y_ALL = re.compile(r"\by'all\b")
# words whose final period it keeps (measured with its jar: "the st. x" and "the st." keep "st.")
_ABBREVIATIONS = frozenset(
    "adm al ala apr ariz assn aug ave blvd bros calif capt co col colo conn corp cos ct dec dept dr drs esq est etc "
    "ext feb fla fri ft ga gen gov hon inc ind jan jr jul jun kan ky lt ltd maj mar md mich minn mo mon mont mr mrs "
    "ms mt neb nev nov oct okla penn plc pres prof rd rep rev sen sep sept seq sgt sq sr st ste tel tenn thu thurs "
    "tue tues univ va vs vt wed wis wyo".split())


def _peel(token: str) -> list[str]:
    """Split punctuation off the ends of one whitespace token, keeping abbreviations (a.m., u.s., st.)."""
    if token in _SUFFIXES or token in _KEPT or token in _BRACKETS.values() or _KEPT_APOSTROPHE.match(token):
        return [token]
    head: list[str] = []
    while token and token[0] in _LEADING and not _KEPT_APOSTROPHE.match(token.rstrip(_TRAILING)):
        head.append(token[0])
        token = token[1:]
    tail: list[str] = []
    while token and token[-1] in _TRAILING:
        if token.endswith("..."):
            piece = "..."
        elif token[-1] in "!?":
            piece = token[len(token.rstrip("!?")):]  # PTB keeps a run such as "!!" or "?!" as one token
        elif token[-1] == "." and token[-2:] != ".." and ("." in token[:-1] or token[:-1] in _ABBREVIATIONS):
            break  # an abbreviation such as a.m. or st. (but PTB splits "st.." into "st." and ".")
        else:
            piece = token[-1]
        tail.insert(0, piece)
        token = token[: len(token) - len(piece)]
    return head + ([token] if token else []) + tail


def simple_tokenize(caption: str) -> str:
    """Pure-Python stand-in for the toolkit's PTB tokenization (used without Java): lower-case,
    brackets as -lrb- etc., contractions, symbols and end punctuation split off, then the punctuation
    tokens the toolkit drops are dropped. It gives the toolkit's tokens for plain words and for symbols,
    curly quotes, dashes, contractions, abbreviations, times and fractions among them
    (tests/evaluation/test_eval_metrics.py)."""
    text = _ENTITIES.sub(lambda m: _ENTITY_CHARACTERS[m[1].lower()], caption.replace("\n", " "))
    for character, reading in _CHARACTERS.items():
        text = text.replace(character, reading)
    text = _SIGNED_NUMBER.sub(r" \1", _SYMBOLS.sub(r" \1 ", text)).lower()
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    text = _NUMBER_UNIT.sub(r"\1 \2", _BETWEEN_DIGITS.sub(" '", text))
    text = _CONTRACTION.sub(r" \1", _Y_ALL.sub("y' all", text.replace("'n'", " 'n' ")))
    text = _BEFORE_NUMBER.sub(rf"\1{_KEPT_PERIOD} ", text)
    tokens: list[str] = []
    for piece in (piece.replace(_KEPT_PERIOD, ".") for token in text.split() for piece in _peel(token)):
        if tokens and tokens[-1].isdigit() and _FRACTION.fullmatch(piece):  # 1 9/11: one token, a no-break space
            tokens[-1] += "\u00a0" + piece
        else:
            tokens.append(piece)
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t != '"')


def tokenize(captions: Mapping[object, list[str]]) -> dict[object, list[str]]:
    """image id -> caption strings, tokenized as coco-caption does (PTB with Java, else Python)."""
    if not java_available():
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    with _held_stderr() as held:
        tokenized = ptb_tokenize(captions)
    # the toolkit reads no exit status: a Java that fails yields one empty line, which it takes as output
    given = [c for v in captions.values() for c in v]
    got = [c for v in tokenized.values() for c in v]
    last_word = max((i for i, c in enumerate(given) if any(ch.isalnum() for ch in c)), default=-1)
    if last_word >= 0 and (len(got) <= last_word or not got[last_word]):
        said = " / ".join(line.strip() for line in held.text.strip().splitlines())[-300:] or "no output"
        raise SaticError(f"the COCO toolkit's PTB tokenizer (Java) failed: {said}; check `java -version`, or take "
                         "java off PATH to score with satic's Python tokenizer")
    return {k: tokenized.get(k, []) for k in captions}


def ptb_tokenize(captions: Mapping[object, list[str]]) -> dict[object, list[str]]:
    """What the toolkit's PTBTokenizer.tokenize gives (its CoreNLP jar, -preserveLines -lowerCase, then its
    punctuation dropped), with the sentence file in the system's temporary folder: the toolkit writes it
    beside the jar, inside the installed package, where a user who did not install it cannot write."""
    keys = [key for key, texts in captions.items() for _ in texts]
    sentences = "\n".join(_LINE_BREAKS.sub(" ", text) for texts in captions.values() for text in texts)
    with tempfile.TemporaryDirectory(prefix="satic-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_bytes(sentences.encode())
        done = subprocess.run(["java", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], stdout=subprocess.PIPE)
    tokenized: dict[object, list[str]] = {}
    for key, line in zip(keys, done.stdout.decode().split("\n")):
        tokenized.setdefault(key, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS))
    return tokenized


class _Held:
    text = ""  # what was written to stderr, once the block has ended


@contextmanager
def _held_stderr() -> Iterator[_Held]:
    """Hold what is written to file descriptor 2 (the Java tokenizer's line on its speed would break
    progress bars at every validation); it is passed on if the block raises."""
    sys.stderr.flush()
    box, failed = _Held(), False
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield box
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            box.text = held.read().decode(errors="replace")
            if failed:
                sys.stderr.write(box.text)


# ---------------------------------------------------------------- scorers


class Bleu:
    """BLEU-1..n from the toolkit; compute_score returns ([n means], [n per-image lists])."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[list[float], list[list[float]]]:
        check_captions(gts, res)
        return _ToolkitBleu(self.n).compute_score(dict(gts), dict(res), verbose=0)

    def method(self) -> str:
        return "Bleu"


class Rouge:
    """ROUGE-L from the toolkit."""

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
        check_captions(gts, res)
        score, scores = _ToolkitRouge().compute_score(dict(gts), dict(res))
        return float(score), np.asarray(scores)

    def method(self) -> str:
        return "ROUGE_L"


class Meteor:
    """METEOR from the toolkit's Java process, started on first use and closed by close()/with."""

    def __init__(self) -> None:
        self._scorer: _ToolkitMeteor | None = None

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
        check_captions(gts, res)
        if self._scorer is None:
            require_java("METEOR")
            with deferred_interrupts():  # a stop here would leave the Java process to an object without its lock
                self._scorer = _ToolkitMeteor()
        score, scores = self._scorer.compute_score(dict(gts), dict(res))
        return float(score), np.asarray(scores)

    def close(self) -> None:
        """Stop the Java process and close its pipes (the toolkit only does so when collected)."""
        if self._scorer is None:
            return
        scorer, self._scorer = self._scorer, None
        proc = scorer.meteor_p
        scorer.lock = threading.Lock()  # held where Ctrl-C stopped compute_score: its __del__ would wait for ever
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
        proc.kill()
        proc.wait()

    def __enter__(self) -> "Meteor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def method(self) -> str:
        return "METEOR"


def spice_jar_dir() -> Path | None:
    """Folder holding the CoreNLP 3.6.0 jars SPICE needs, or None when they are not installed."""
    candidates = [Path(os.environ[SPICE_JARS_ENV])] if os.environ.get(SPICE_JARS_ENV) else []
    candidates.append(TOOLKIT / "spice" / "lib")
    return next((d for d in candidates if all((d / j).is_file() for j in CORENLP_JARS)), None)


def spice_unavailable_reason() -> str | None:
    if not java_available():
        return f"SPICE skipped: Java is not on PATH ({INSTALL_JAVA})"
    if spice_jar_dir() is None:
        return (f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found; put {' and '.join(CORENLP_JARS)} "
                f"in ${SPICE_JARS_ENV} or {TOOLKIT / 'spice' / 'lib'}")
    return None


class Spice:
    """SPICE from the toolkit's jar; per-image scores are the 'All' F-scores."""

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
        image_ids, hyps, refs = check_captions(gts, res)
        reason = spice_unavailable_reason()
        if reason:
            raise SaticError(reason)
        spice_dir = TOOLKIT / "spice"
        classpath = os.pathsep.join([str(spice_dir / "spice-1.0.jar"), str(spice_dir / "lib" / "*"),
                                     str(spice_jar_dir() / "*")])
        with tempfile.TemporaryDirectory(prefix="satic-spice-") as tmp:
            in_file, out_file = Path(tmp) / "in.json", Path(tmp) / "out.json"
            items = [{"image_id": i, "test": h, "refs": r} for i, (h, r) in enumerate(zip(hyps, refs))]
            in_file.write_text(json.dumps(items))
            cmd = ["java", "-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", str(in_file),
                   "-out", str(out_file), "-subset", "-silent"]
            done = subprocess.run(cmd, cwd=spice_dir, capture_output=True, text=True)
            if done.returncode != 0:
                raise SaticError(f"SPICE failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
            by_index = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(out_file.read_text())}
        scores = np.array([float(by_index[i]) if by_index.get(i) is not None else np.nan
                           for i in range(len(image_ids))])
        return float(np.nanmean(scores)) if len(scores) else float("nan"), scores

    def method(self) -> str:
        return "SPICE"


# ---------------------------------------------------------------- all at once

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "bad_count_rate")
# eval_utils.py's list for bad_count_rate (another list than the one remove_bad_endings trims: they overlap)
BAD_COUNT_ENDINGS = frozenset(("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon",
                               "near", "to", "is", "are", "am"))


def bad_count_rate(captions: Iterable[str]) -> float:
    """The share of captions whose last word (split on spaces, as written) is in BAD_COUNT_ENDINGS: the
    reference's language_eval reports it beside the toolkit's metrics."""
    flags = [caption.split(" ")[-1] in BAD_COUNT_ENDINGS for caption in captions]
    return sum(flags) / len(flags) if flags else 0.0


def coco_metrics(gts: Mapping, res: Mapping, spice: bool = False, gts_tokenized: Mapping | None = None
                 ) -> tuple[dict[str, float], dict]:
    """The coco-caption evaluation of raw caption strings.

    gts: image id -> reference strings, res: image id -> [candidate string]; gts_tokenized: tokenize(gts)
    when the caller already has it (validation scores the same references again and again). Keep gts in the
    reference file's image order, as read_references gives it: the toolkit's PTB tokenizer reads each caption
    with the start of the next one, and COCOEvalCap feeds it the images (and the candidates) in that order.
    Returns (overall {metric: value} with the toolkit's names, and the reference's bad_count_rate;
    per-image {image id: {metric: value}}); metrics that cannot run here (METEOR without Java, SPICE
    without its jars) are left out after one logged line each.
    """
    return coco_metrics_of_sets(gts, {"": res}, spice, gts_tokenized)[""]


def coco_metrics_of_sets(gts: Mapping, results: Mapping[str, Mapping], spice: bool = False,
                         gts_tokenized: Mapping | None = None) -> dict[str, tuple[dict[str, float], dict]]:
    """coco_metrics of several result sets {name: res}, each covering the images of gts -> {name:
    (overall, per_image)}. Each set is scored on its own (corpus-level BLEU and METEOR per set); the
    tokenizer runs once and one METEOR process serves every set: the Java start-ups cost far more
    than scoring a small split."""
    for res in results.values():
        check_captions(gts, res)
    image_ids = list(gts)
    gts_tok = tokenize(gts) if gts_tokenized is None else gts_tokenized
    # candidates in the order of gts, as the toolkit's COCOEvalCap lines them up (PTB tokens depend on the next line)
    keyed = tokenize({(name, i): res[i] for name, res in results.items() for i in image_ids})
    if not java_available():
        warn_once(f"Java not found: PTB tokenization replaced by a Python tokenizer, METEOR skipped ({INSTALL_JAVA})")
    spice_reason = spice_unavailable_reason() if spice else None
    if spice_reason:
        warn_once(spice_reason)
    out = {}
    with Meteor() as meteor:
        for name, res in results.items():
            refs, hyps = gts_tok, {i: keyed[(name, i)] for i in image_ids}
            overall: dict[str, float] = {}
            per_image: dict = {i: {} for i in image_ids}

            def record(metric: str, score: float, scores) -> None:
                overall[metric] = float(score)
                for i, s in zip(image_ids, scores):
                    per_image[i][metric] = float(s)

            means, lists = Bleu(4).compute_score(refs, hyps)
            for n, (score, scores) in enumerate(zip(means, lists), start=1):
                record(f"Bleu_{n}", score, scores)
            if java_available():
                record("METEOR", *meteor.compute_score(refs, hyps))
            record("ROUGE_L", *Rouge().compute_score(refs, hyps))
            record("CIDEr", *Cider().compute_score(refs, hyps))
            if spice and not spice_reason:
                record("SPICE", *Spice().compute_score(refs, hyps))
            overall["bad_count_rate"] = bad_count_rate(c for i in image_ids for c in res[i])
            out[name] = (overall, per_image)
    return out


def format_table(overall: Mapping[str, float], num_images: int | None = None) -> str:
    """The metrics as a small text table (toolkit value and the x100 figure papers quote)."""
    rows = [[name, f"{overall[name]:.4f}", f"{overall[name] * 100:.1f}"] for name in METRIC_NAMES if name in overall]
    table = text_table(["metric", "value", "x100"], rows)
    return table if num_images is None else f"{table}\n({num_images} images)"
