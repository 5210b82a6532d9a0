"""Exact resume after a crash, atomic checkpoint writes, safe checkpoints, run directories."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_DATA, TINY_MODEL, compose_config
from omegaconf import open_dict

from captioner.checkpoint import KEY, CheckpointError, load_checkpoint
from captioner.cli.train import run as train_run
from captioner.training.checkpoint_io import AtomicCheckpointIO
from captioner.utils.hydra import run_dir
from captioner.utils.io import atomic_open, leftover_temp_files

ROOT = Path(__file__).resolve().parents[2]
# ReduceLROnPlateau with patience 0 and an unreachable threshold halves the LR after every
# epoch but the first: a scheduler step lost on resume changes the result.
EXACT = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "test=false",
         "scheduler.patience=0", "+scheduler.threshold=100.0"]


class CrashInEpoch(L.Callback):
    """Raises in the second batch of ``epoch``: a crash after that epoch began."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("simulated crash")


class PauseInEpoch(L.Callback):
    """Subprocess hook: in the second batch of ``epoch`` touch ``marker`` and wait to be killed."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            Path(self.marker).touch()
            time.sleep(600)

def pause_env() -> dict:
    """The environment of a training subprocess that can load ``PauseInEpoch`` from here."""
    here = Path(__file__).resolve().parent  # this module, and the conftest it imports
    path = os.pathsep.join([str(here), str(here.parent), str(here.parents[1]),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def kill_in_epoch(command: list[str], epoch: int, cwd: Path, env: dict, marker: Path) -> None:
    """Run a training command until it is inside ``epoch`` (``PauseInEpoch``), then SIGKILL it."""
    proc = subprocess.Popen(command + ["+callbacks.pause._target_=test_reliability.PauseInEpoch",
                                       f"+callbacks.pause.epoch={epoch}",
                                       f"+callbacks.pause.marker={marker}"],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the training never reached the pause"
    proc.send_signal(signal.SIGKILL)
    proc.wait()



def weights(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_training_state(a: Path, b: Path):
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert ca["epoch"] == cb["epoch"] and ca["global_step"] == cb["global_step"]
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)


# ---- a trained checkpoint, shared ----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root) -> Path:
    out = tmp_path_factory.mktemp("ckpt_run")
    train_run(compose_config("train", [
        f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "test=false", "~logger"], out))
    return out / "checkpoints" / "last.ckpt"


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, synthetic_root):
    def cfg(out, *extra):
        return compose_config("train", [f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL,
                                        "trainer.accelerator=cpu", "~logger", *EXACT, *extra], out)

    straight = train_run(cfg(tmp_path / "straight"))
    crashing = cfg(tmp_path / "resumed")
    with open_dict(crashing):
        crashing.callbacks.crash = {"_target_": "test_reliability.CrashInEpoch", "epoch": 1}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(crashing)
    assert torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)["epoch"] == 0
    resumed = train_run(cfg(tmp_path / "resumed", "ckpt_path=last"))
    for key in ("val/cider", "val/bleu4", "val/loss", "train/loss"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-7), key
    assert_same_training_state(tmp_path / "straight/checkpoints/last.ckpt",
                               tmp_path / "resumed/checkpoints/last.ckpt")
    assert json.loads((tmp_path / "resumed/metrics.json").read_text()) == resumed


def test_resume_takes_tokenizer_from_checkpoint_and_refuses_other_model(checkpoint, train_cfg, monkeypatch):
    _, tokenizer, _ = load_checkpoint(checkpoint)

    import captioner.data.datamodule as dm

    def no_retraining(*args, **kwargs):
        raise AssertionError("resume retrained the tokenizer")

    monkeypatch.setattr(dm, "train_tokenizer", no_retraining)
    seen = {}
    monkeypatch.setattr(dm.CaptionDataModule, "set_tokenizer",
                        lambda self, tok: seen.update(vocab=tok.get_vocab()) or setattr(self, "tokenizer", tok))
    metrics = train_run(train_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=1", "test=false",
                                  f"ckpt_path={checkpoint}"))
    assert seen["vocab"] == tokenizer.get_vocab() and "val/cider" in metrics
    with pytest.raises(CheckpointError, match=r"different model config.*hidden_size: checkpoint 32, config 48"):
        train_run(train_cfg("trainer.max_epochs=3", "model.decoder.hidden_size=48", f"ckpt_path={checkpoint}"))


def test_ckpt_path_last_without_a_run_is_a_clear_error(train_cfg):
    with pytest.raises(CheckpointError, match="ckpt_path=last: no earlier run"):
        train_run(train_cfg("ckpt_path=last"))


def test_run_dir_resolver(tmp_path):
    task = tmp_path / "outputs" / "train"
    old, new = task / "runs" / "old", task / "multiruns" / "sweep" / "3"
    for i, run in enumerate([old, new]):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        os.utime(run / "checkpoints" / "last.ckpt", (1000 + i, 1000 + i))
    fresh = str(task / "runs" / "fresh")
    assert run_dir(None, str(task), fresh) == fresh
    assert run_dir("last", str(task), fresh) == str(new)  # newest, multirun jobs included
    assert run_dir(str(old / "checkpoints" / "last.ckpt"), str(task), fresh) == str(old)
    (tmp_path / "loose.ckpt").write_bytes(b"x")  # not inside a run: a new run dir
    assert run_dir(str(tmp_path / "loose.ckpt"), str(task), fresh) == fresh
    assert run_dir("last", str(tmp_path / "nothing"), fresh) == fresh


# ---- run directories through the real Hydra entry point (no torch: a trivial task function) ----
HYDRA_PROBE = """
import sys
import hydra
from hydra.core.hydra_config import HydraConfig
from captioner.utils.hydra import CONFIG_DIR, register_resolvers
register_resolvers()

@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg):
    print("RUN_DIR", HydraConfig.get().runtime.output_dir, flush=True)

main()
"""


def hydra_probe(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HYDRA_PROBE, *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_dirs(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("RUN_DIR ")]


def test_runs_started_together_get_their_own_dirs_and_resume_reuses_its_dir(tmp_path):
    procs = [hydra_probe(tmp_path) for _ in range(3)]  # same second, same config
    dirs = [d for p in procs for d in run_dirs(p)]
    assert len(set(dirs)) == 3 and all(Path(d).is_dir() for d in dirs)
    sweep = run_dirs(hydra_probe(tmp_path, "-m", "seed=1,2"))
    assert len(sweep) == 2 and Path(sweep[0]).parent == Path(sweep[1]).parent  # one sweep dir
    assert {Path(d).name for d in sweep} == {"0", "1"}
    ckpt = Path(tmp_path / dirs[1]) / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    # (a stand-in checkpoint: the start checks, which would refuse it, are off here)
    no_checks = "~hydra.callbacks.start_checks"
    assert run_dirs(hydra_probe(tmp_path, "ckpt_path=last", no_checks)) == [dirs[1]]
    assert run_dirs(hydra_probe(tmp_path, f"ckpt_path={ckpt}", no_checks)) == [str(ckpt.parents[1])]
    assert len(list((tmp_path / "outputs" / "train" / "runs").iterdir())) == 3  # no new run dir


# ---- the real CLI, killed mid-epoch -------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_last_equals_uninterrupted_run(tmp_path, synthetic_root):
    base = [sys.executable, str(ROOT / "train.py"), f"data.root={synthetic_root}", *TINY_DATA,
            *TINY_MODEL, "trainer.accelerator=cpu", "~logger", "~callbacks.progress_bar", *EXACT]
    env = pause_env()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = subprocess.run(base, cwd=tmp_path / "a", env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    kill_in_epoch(base, 1, tmp_path / "b", env, tmp_path / "paused")
    (run,) = (tmp_path / "b" / "outputs" / "train" / "runs").iterdir()
    assert not (run / "metrics.json").exists()

    resumed = subprocess.run(base + ["ckpt_path=last"], cwd=tmp_path / "b", env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((tmp_path / "b" / "outputs" / "train" / "runs").iterdir()) == [run]  # same dir
    (straight_run,) = (tmp_path / "a" / "outputs" / "train" / "runs").iterdir()
    expected = json.loads((straight_run / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert_same_training_state(straight_run / "checkpoints/last.ckpt", run / "checkpoints/last.ckpt")
    assert not leftover_temp_files(run / "checkpoints" / "last.ckpt")


# ---- atomic writes ------------------------------------------------------------------------------
def test_checkpoint_save_interrupted_midway_keeps_old_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def half_then_crash(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no partial file under any name


KILLED_WRITER = """
import sys, time
from pathlib import Path
from captioner.utils.io import atomic_open
with atomic_open(sys.argv[1]) as f:
    f.write(b"n" * 50_000_000)
    f.flush()
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_write_killed_midway_leaves_old_file_and_next_write_clears_temp(tmp_path):
    path, marker = tmp_path / "features.bin", tmp_path / "writing"
    path.write_bytes(b"old contents")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(marker)])
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == b"old contents"
    assert len(leftover_temp_files(path)) == 1  # hidden, never under the final name
    with atomic_open(path, remove_stale=True) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and not leftover_temp_files(path)


class NotPlainData:
    pass


def tampered(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize("make, message", [
    (lambda src, p: p.write_bytes(src.read_bytes()[: src.stat().st_size // 2]) and p, "not a readable checkpoint"),
    (lambda src, p: p.write_bytes(b"") or p, "not a readable checkpoint"),
    (lambda src, p: p.write_text("hello, not a checkpoint") and p, "not a readable checkpoint"),
    (lambda src, p: torch.save({"x": NotPlainData()}, p) or p, "not a readable checkpoint"),
    (lambda src, p: torch.save({"state_dict": {}}, p) or p, "without the 'captioner' payload"),
    (lambda src, p: torch.save([1, 2], p) or p, "not a Lightning checkpoint"),
    (lambda src, p: tampered(src, p, lambda c: c[KEY].update(format_version=99)), "format 99"),
    (lambda src, p: tampered(src, p, lambda c: c[KEY].pop("tokenizer")), "lacks \\['tokenizer'\\]"),
    (lambda src, p: tampered(src, p, lambda c: c[KEY]["model_config"].update(vocab_size=7)),
     r"weights do not fit the model config: shapes differ"),
    (lambda src, p: tampered(src, p, lambda c: c[KEY]["model_config"].update(_target_="os.system")),
     "is not one of"),
    (lambda src, p: p.mkdir() or p, "is a directory"),
    (lambda src, p: p, "checkpoint not found"),
])
def test_bad_checkpoints_are_named_clearly(checkpoint, tmp_path, make, message):
    path = make(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path)
    assert "bad.ckpt" in str(e.value)


def test_good_checkpoint_loads(checkpoint):
    model, tokenizer, payload = load_checkpoint(checkpoint)
    assert not model.training and payload["image_size"] == 32 and len(tokenizer) > 4
