"""COCO caption evaluation report (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, optional SPICE).

Numbers are pycocoevalcap's, but the Java tools are driven here rather than through
pycocoevalcap's wrappers, because those

* write temporary files into the installed package directory (``PTBTokenizer`` and ``Spice``)
  which breaks read-only installs (site-packages owned by root, containers, Nix, ...);
* start METEOR with ``cwd`` in the package directory and ``stderr=PIPE`` that is never read,
  and on a Java failure die with a bare ``BrokenPipeError`` / ``ValueError`` instead of
  Java's message;
* download ~400 MB of Stanford CoreNLP models on the first SPICE call (hangs or crashes
  offline).

Here every Java process runs with its working directory and files in a private temporary
directory and the jars referenced by absolute path (read-only installs work), Java's stderr
is captured into the raised error, and every call has a timeout.  BLEU and CIDEr-D use the
in-process implementations (:mod:`captioner.metrics.bleu`, :mod:`captioner.metrics.cider`),
which equal pycocoevalcap's to 1e-9; ROUGE-L uses pycocoevalcap's pure-Python ``Rouge``.

Without Java (``shutil.which("java")`` is None) one warning is logged, captions are tokenized
with the pure-Python :func:`captioner.metrics.text.tokenize`, and METEOR/SPICE are reported in
``EvalReport.skipped``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner.metrics.bleu import bleu
from captioner.metrics.cider import cider_d
from captioner.metrics.text import PUNCTUATIONS, tokenize

log = logging.getLogger(__name__)

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")

TOKENIZER_TIMEOUT_S = 300.0
METEOR_TIMEOUT_S = 600.0
SPICE_TIMEOUT_S = 1800.0

_LINE_BREAKS = str.maketrans({c: " " for c in "\r\n\u000b\u000c\u0085\u2028\u2029"})


class JavaMetricError(RuntimeError):
    """A Java-based metric (tokenizer, METEOR, SPICE) failed; the message has Java's stderr."""


@dataclass
class EvalReport:
    metrics: dict[str, float]
    per_image: dict[Hashable, dict[str, float]]
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"  # "ptb" (Stanford, Java) or "python" (approximation)


def find_java() -> str | None:
    """Path of the ``java`` executable or None (tests monkeypatch this or ``shutil.which``)."""
    return shutil.which("java")


def _package_dir() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__)))


def _tail(text: str | bytes, n: int = 2000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return text[-n:] if text else "(no stderr)"


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


def ptb_tokenize_java(captions: Sequence[str], java: str = "java",
                      timeout: float = TOKENIZER_TIMEOUT_S) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer`` (same jar, same flags, same punctuation removal), but the
    input file lives in a private temp dir instead of the package directory."""
    if not captions:
        return []
    jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="captioner-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(c.translate(_LINE_BREAKS) for c in captions),
                        encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", path.name]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise JavaMetricError(f"PTB tokenizer (Java) timed out after {timeout:.0f}s: "
                                  f"{_tail(e.stderr or b'')}") from e
        except OSError as e:
            raise JavaMetricError(f"PTB tokenizer: cannot run {java!r}: {e}") from e
    if proc.returncode != 0:
        raise JavaMetricError(f"PTB tokenizer (Java) failed with exit code {proc.returncode}: "
                              f"{_tail(proc.stderr)}")
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) < len(captions):
        raise JavaMetricError(f"PTB tokenizer (Java) returned {len(lines)} lines for "
                              f"{len(captions)} captions: {_tail(proc.stderr)}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in lines[: len(captions)]]


def _tokenize_all(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str],
                  ids: list, java: str | None):
    flat = [hyps[i] for i in ids]
    for i in ids:
        flat.extend(refs[i])
    if java is None:
        toks = [tokenize(c) for c in flat]
    else:
        toks = ptb_tokenize_java(flat, java)
    th = dict(zip(ids, toks[: len(ids)]))
    tr, k = {}, len(ids)
    for i in ids:
        m = len(refs[i])
        tr[i] = toks[k: k + m]
        k += m
    return tr, th


# ---------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------


class MeteorProcess:
    """A long-lived ``meteor-1.5.jar -stdio`` process (the paraphrase table takes seconds to
    load, so it is started once and reused).  Same command line as pycocoevalcap's ``Meteor``,
    but cwd in a temp dir, stderr to a file (never blocks), batched I/O, timeouts."""

    def __init__(self, java: str = "java", mem: str = "2G") -> None:
        jar = _package_dir() / "meteor" / "meteor-1.5.jar"
        self.java = java
        self._tmp = tempfile.TemporaryDirectory(prefix="captioner-meteor-")
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+b")  # noqa: SIM115
        self._lock = threading.Lock()
        cmd = [java, "-jar", f"-Xmx{mem}", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self.proc = subprocess.Popen(cmd, cwd=self._tmp.name, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr)
        except OSError as e:
            raise JavaMetricError(f"METEOR: cannot run {java!r}: {e}") from e

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _error(self, what: str) -> JavaMetricError:
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._stderr.seek(0)
        err = self._stderr.read()
        return JavaMetricError(f"METEOR (Java) failed ({what}, exit code {self.proc.poll()}): "
                               f"{_tail(err)}")

    def _exchange(self, lines: list[str], n_out: int, timeout: float) -> list[str]:
        """Write ``lines`` (from a thread, so a full stdout pipe cannot deadlock us) and read
        ``n_out`` answer lines."""
        payload = "".join(line + "\n" for line in lines).encode("utf-8")
        write_err: list[BaseException] = []

        def writer() -> None:
            try:
                self.proc.stdin.write(payload)
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:  # BrokenPipe when java died
                write_err.append(e)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        out: list[str] = []
        fired: list[bool] = []

        def on_timeout() -> None:
            fired.append(True)
            self.proc.kill()

        timer = threading.Timer(timeout, on_timeout)
        timer.start()
        try:
            for _ in range(n_out):
                line = self.proc.stdout.readline()
                if not line:
                    break
                out.append(line.decode("utf-8", "replace").strip())
        finally:
            timer.cancel()
        t.join(timeout=5)
        if len(out) < n_out:
            if fired:
                raise self._error(f"timed out after {timeout:.0f}s")
            raise self._error("process died" + (
                f", {type(write_err[0]).__name__} on stdin" if write_err else ""))
        return out

    def score(self, refs: list[list[str]], hyps: list[str],
              timeout: float = METEOR_TIMEOUT_S) -> tuple[float, list[float]]:
        with self._lock:
            if not self.alive():
                raise self._error("not running")
            score_lines = []
            for h, rs in zip(hyps, refs):
                h = h.replace("|||", "").replace("  ", " ")  # as pycocoevalcap
                rs = [r.replace("|||", "") for r in rs]
                score_lines.append(" ||| ".join(("SCORE", " ||| ".join(rs), h)))
            stats = self._exchange(score_lines, len(hyps), timeout)
            eval_line = "EVAL ||| " + " ||| ".join(stats)
            out = self._exchange([eval_line], len(hyps) + 1, timeout)
            try:
                per = [float(x) for x in out[:-1]]
                total = float(out[-1])
            except ValueError as e:
                raise self._error(f"unparsable output {out[:3]!r}") from e
            return total, per

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._stderr.close()
        self._tmp.cleanup()


_meteor: MeteorProcess | None = None
_meteor_lock = threading.Lock()


def _get_meteor(java: str) -> MeteorProcess:
    global _meteor
    with _meteor_lock:
        if _meteor is None or not _meteor.alive() or _meteor.java != java:
            if _meteor is not None:
                _meteor.close()
            _meteor = MeteorProcess(java)
        return _meteor


@atexit.register
def close_meteor() -> None:
    """Stop the shared METEOR process (it is restarted on demand)."""
    global _meteor
    with _meteor_lock:
        if _meteor is not None:
            _meteor.close()
            _meteor = None


def run_meteor(refs: list[list[str]], hyps: list[str],
               java: str = "java") -> tuple[float, list[float]]:
    """METEOR 1.5 (pycocoevalcap's jar and options) -> (corpus score, per-caption scores)."""
    if not hyps:
        return 0.0, []
    m = _get_meteor(java)
    try:
        return m.score(refs, hyps)
    except JavaMetricError:
        close_meteor()
        raise


# ---------------------------------------------------------------------------------------------
# SPICE
# ---------------------------------------------------------------------------------------------


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here (None if it can be tried)."""
    lib = _package_dir() / "spice" / "lib"
    missing = [f for f in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not (lib / f).exists()]
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} missing in {lib}); "
                "pycocoevalcap downloads it on first use, which is impossible offline - run "
                "`python -m pycocoevalcap.spice.get_stanford_models` once with network access")
    return None


def run_spice(refs: list[list[str]], hyps: list[str], java: str = "java",
              timeout: float = SPICE_TIMEOUT_S) -> tuple[float, list[float]]:
    """SPICE 1.0 (pycocoevalcap's jar and options) -> (mean F-score, per-caption F-scores)."""
    jar = _package_dir() / "spice" / "spice-1.0.jar"
    cache = Path(os.environ.get("CAPTIONER_SPICE_CACHE",
                                Path.home() / ".cache" / "captioner" / "spice"))
    with tempfile.TemporaryDirectory(prefix="captioner-spice-") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps([{"image_id": k, "test": h, "refs": r}
                                   for k, (h, r) in enumerate(zip(hyps, refs))]))
        cmd = [java, "-jar", "-Xmx8G", str(jar), str(inp), "-out", str(out), "-subset",
               "-silent"]
        try:
            cache.mkdir(parents=True, exist_ok=True)
            cmd[5:5] = ["-cache", str(cache)]
        except OSError:
            pass
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise JavaMetricError(f"SPICE timed out after {timeout:.0f}s") from e
        if proc.returncode != 0 or not out.exists():
            raise JavaMetricError(f"SPICE (Java) failed with exit code {proc.returncode}: "
                                  f"{_tail(proc.stderr, 500)}")
        results = json.loads(out.read_text())
    by_k = {int(r["image_id"]): r["scores"]["All"]["f"] for r in results}
    per = []
    for k in range(len(hyps)):
        try:
            per.append(float(by_k[k]))
        except (KeyError, TypeError, ValueError):
            per.append(float("nan"))
    return float(np.nanmean(per)) if per else 0.0, per


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _rouge(refs: Mapping, hyps: Mapping, ids: list) -> tuple[float, list[float]]:
    from pycocoevalcap.rouge.rouge import Rouge

    r = Rouge()
    per = [float(r.calc_score([hyps[i]], refs[i])) for i in ids]
    return float(np.mean(per)), per


def evaluate_captions(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, Any],
                      spice: bool = False) -> EvalReport:
    """Evaluate raw (untokenized) captions: ``refs`` image id -> reference captions, ``hyps``
    image id -> generated caption.  Returns an :class:`EvalReport` with ``metrics`` keys
    bleu1..4, meteor, rouge_l, cider (+ spice when asked and available); metrics that could not
    be computed are listed in ``skipped`` with a one-line reason."""
    missing = set(hyps) - set(refs)
    if missing:
        raise ValueError(f"{len(missing)} hypotheses have no references, e.g. "
                         f"{next(iter(missing))!r}")
    ids = [i for i in refs if i in hyps]
    if len(ids) < len(refs):
        log.warning("evaluating %d of %d images (the others have no hypothesis)", len(ids),
                    len(refs))
    hyps = {i: (h if isinstance(h, str) else h[0]) for i, h in hyps.items()}
    refs = {i: list(refs[i]) for i in ids}
    for i in ids:
        if not refs[i]:
            raise ValueError(f"image {i!r} has no reference captions")

    skipped: dict[str, str] = {}
    java = find_java()
    if java is None:
        reason = "Java not found (java is not on PATH)"
        log.warning("Java not found: METEOR%s skipped, captions tokenized with the pure-Python "
                    "PTB approximation (BLEU/ROUGE-L/CIDEr may differ slightly from the "
                    "official numbers)", " and SPICE" if spice else "")
        skipped["meteor"] = reason
        if spice:
            skipped["spice"] = reason
    per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}
    metrics: dict[str, float] = {}
    if not ids:
        return EvalReport({k: 0.0 for k in METRIC_KEYS if k not in skipped}, {}, skipped,
                          "ptb" if java else "python")

    tr, th = _tokenize_all(refs, hyps, ids, java)

    b, bper = bleu(tr, th, 4)
    for k in range(4):
        metrics[f"bleu{k + 1}"] = float(b[k])
    for i in ids:
        for k in range(4):
            per_image[i][f"bleu{k + 1}"] = float(bper[i][k])

    if java is not None:
        m, mper = run_meteor([tr[i] for i in ids], [th[i] for i in ids], java)
        metrics["meteor"] = float(m)
        for i, v in zip(ids, mper):
            per_image[i]["meteor"] = v

    r, rper = _rouge(tr, th, ids)
    metrics["rouge_l"] = r
    for i, v in zip(ids, rper):
        per_image[i]["rouge_l"] = v

    c, cper = cider_d(tr, th)
    metrics["cider"] = float(c)
    for i in ids:
        per_image[i]["cider"] = float(cper[i])

    if spice and java is not None:
        reason = spice_unavailable_reason()
        if reason is None:
            try:
                s, sper = run_spice([tr[i] for i in ids], [th[i] for i in ids], java)
                metrics["spice"] = s
                for i, v in zip(ids, sper):
                    per_image[i]["spice"] = v
            except JavaMetricError as e:
                reason = " ".join(str(e).split())[:400] or "SPICE failed"
        if reason is not None:
            log.warning("SPICE skipped: %s", reason)
            skipped["spice"] = reason
    return EvalReport(metrics, per_image, skipped, "ptb" if java else "python")
