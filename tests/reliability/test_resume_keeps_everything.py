"""Resuming loses nothing: last.ckpt is the last finished epoch, metrics of earlier epochs stay
in the CSV, the run's original config stays in .hydra/, a refused resume changes no file, and
ckpt_path=last never guesses between runs."""

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA, TINY_MODEL, compose_config
from test_reliability import kill_in_epoch, pause_env

from captioner.cli.train import run as train_run
from captioner.training.csv_logger import AppendingCSVLogger
from captioner.utils.hydra import AmbiguousResume, run_to_resume

ROOT = Path(__file__).resolve().parents[2]


def epoch_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]


def csv_epochs(run: Path) -> set[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return {int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("epoch")}


def test_last_ckpt_is_every_epoch_and_extending_a_run_keeps_its_csv(tmp_path, synthetic_root):
    def cfg(*extra):
        return compose_config("train", [
            f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "trainer.accelerator=cpu",
            "trainer.limit_train_batches=2", "test=false", "~logger.tensorboard",
            # best.ckpt never improves after epoch 0: with save_last on the best-model callback,
            # last.ckpt stayed at epoch 0
            "callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min",
            *extra], tmp_path)

    train_run(cfg("trainer.max_epochs=2"))
    ckpts = tmp_path / "checkpoints"
    assert epoch_of(ckpts / "best.ckpt") == 0 and epoch_of(ckpts / "last.ckpt") == 1
    assert csv_epochs(tmp_path) == {0, 1}

    train_run(cfg("trainer.max_epochs=3", "ckpt_path=last"))  # one more epoch, not three
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 2
    assert csv_epochs(tmp_path) == {0, 1, 2}


def test_csv_logger_appends_and_keeps_rows_when_columns_change(tmp_path):
    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    second = AppendingCSVLogger(tmp_path, name="csv", version="")  # a resume, same directory
    second.log_metrics({"a": 2.0}, step=1)
    second.log_metrics({"b": 3.0}, step=2)  # a new column: the file is rewritten, rows kept
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["a"], r.get("b", "")) for r in rows] == [("0", "1.0", ""), ("1", "2.0", ""),
                                                                   ("2", "", "3.0")]


def make_run(path: Path, mtime: float, ckpt: bool) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 1\n")
    files = [path / ".hydra" / "config.yaml"]
    if ckpt:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "last.ckpt").write_bytes(b"x")
        files.append(path / "checkpoints" / "last.ckpt")
    for f in files:
        os.utime(f, (mtime, mtime))
    return path


def test_ckpt_path_last_resumes_only_an_unambiguous_run(tmp_path):
    task = tmp_path / "train"
    finished = make_run(task / "runs" / "a_finished", 1000, ckpt=True)
    assert run_to_resume(task) == finished
    crashed = make_run(task / "runs" / "b_crashed_early", 2000, ckpt=False)
    with pytest.raises(AmbiguousResume) as e:
        run_to_resume(task)
    assert str(crashed) in str(e.value) and str(finished) in str(e.value) and "\n" not in str(e.value)
    sweep = task / "multiruns" / "s"
    jobs = [make_run(sweep / str(i), 3000 + i, ckpt=True) for i in range(2)]
    with pytest.raises(AmbiguousResume, match="jobs of one multirun"):
        run_to_resume(task)
    make_run(task / "runs" / "c_newest", 4000, ckpt=True)
    assert run_to_resume(task) == task / "runs" / "c_newest"
    assert jobs  # (the jobs stay resumable by an explicit ckpt_path)


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def cli(*args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_refused_resume_changes_no_file(tmp_path, synthetic_root):
    run = tmp_path / "outputs" / "train" / "runs" / "r1"
    train_run(compose_config("train", [
        f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "test=false"], run))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the original run's config\n")
    (run / "train.log").write_text("the original log\n")
    before = snapshot(tmp_path)
    proc = cli(f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "model.decoder.hidden_size=48",
               "ckpt_path=last", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "hidden_size: checkpoint 32, config 48" in proc.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # two CLI trainings, one killed: ~1 min
def test_sigkill_mid_epoch_then_resume_keeps_config_and_metrics(tmp_path, synthetic_root):
    base = [f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "trainer.accelerator=cpu",
            "trainer.max_epochs=2", "trainer.limit_train_batches=2", "test=false",
            "~logger.tensorboard", "~callbacks.progress_bar"]
    env = pause_env()
    kill_in_epoch([sys.executable, str(ROOT / "train.py"), *base], 1, tmp_path, env, tmp_path / "paused")
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    original = (run / ".hydra" / "config.yaml").read_text()
    assert epoch_of(run / "checkpoints" / "last.ckpt") == 0 and csv_epochs(run) == {0}

    resumed = cli(*base, "ckpt_path=last", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").read_text() == original
    (resume_dir,) = (run / ".hydra").glob("resume-*")
    assert "ckpt_path: last" in (resume_dir / "config.yaml").read_text()
    assert epoch_of(run / "checkpoints" / "last.ckpt") == 1 and csv_epochs(run) == {0, 1}
