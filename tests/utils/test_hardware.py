"""``auto`` precision and threads: each branch forced with a monkeypatched capability or
benchmark, and no config that hard-codes a low precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import open_dict

from captioner.utils import hardware
from captioner.utils.hardware import (
    auto_precision,
    auto_workers,
    resolve_decode_precision,
    resolve_trainer_precision,
    set_threads,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def fresh_choice():
    auto_precision.cache_clear()
    yield
    auto_precision.cache_clear()


def force_cpu(monkeypatch, native: bool, speedup: float):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)


def test_cpu_without_native_bf16_is_fp32_and_never_benchmarks(monkeypatch):
    force_cpu(monkeypatch, native=False, speedup=2.0)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: pytest.fail("benchmarked"))
    precision, reason = resolve_trainer_precision("auto", "cpu")
    assert precision == "32-true" and "no native bf16" in reason
    assert resolve_decode_precision("auto", "cpu") == "fp32"


def test_cpu_with_native_bf16_that_benchmarks_fast_is_bf16(monkeypatch):
    force_cpu(monkeypatch, native=True, speedup=1.9)
    precision, reason = resolve_trainer_precision("auto", "auto")
    assert precision == "bf16-mixed" and "1.90x" in reason
    assert resolve_decode_precision("auto", "cpu") == "bf16"


def test_cpu_flags_claiming_bf16_but_slow_in_practice_is_fp32(monkeypatch):
    force_cpu(monkeypatch, native=True, speedup=0.01)  # emulated: flags lie (e.g. a VM)
    precision, reason = resolve_trainer_precision("auto", "cpu")
    assert precision == "32-true" and "0.01x" in reason


@pytest.mark.parametrize("bf16_ok, trainer, decode", [(True, "bf16-mixed", "bf16"),
                                                       (False, "16-mixed", "fp16")])
def test_cuda_gpus(monkeypatch, bf16_ok, trainer, decode):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: bf16_ok)
    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda device=0: "Some GPU")
    assert resolve_trainer_precision("auto", "gpu")[0] == trainer
    assert resolve_decode_precision("auto", "cuda") == decode
    # the CPU is not asked when training on the GPU
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: pytest.fail("asked the CPU"))
    assert resolve_trainer_precision("auto", "auto")[0] == trainer


def test_explicit_values_win(monkeypatch):
    force_cpu(monkeypatch, native=False, speedup=0.01)
    assert resolve_trainer_precision("bf16-mixed", "cpu") == ("bf16-mixed", "bf16-mixed: set explicitly")
    assert resolve_decode_precision("bf16", "cpu") == "bf16"
    assert resolve_decode_precision(None, "cpu") is None


def test_this_machine_resolves_consistently_with_its_flags():
    """On the real CPU: bf16 is chosen only if the flags say it is native."""
    choice = auto_precision("cpu")
    if not hardware.cpu_has_native_bf16():
        assert choice.trainer == "32-true" and choice.decode == "fp32"
    assert choice.trainer in ("32-true", "bf16-mixed")


def test_micro_benchmark_is_sub_second():
    import time

    start = time.perf_counter()
    speedup = hardware.cpu_bf16_speedup()
    assert speedup > 0 and time.perf_counter() - start < 1.5  # slack for a loaded machine


def test_no_config_hard_codes_a_low_precision():
    """Every trainer precision and decode precision in configs/ is auto (or left to the
    checkpoint): a preset tuned on a bf16 machine would crawl on one without."""
    def walk(node, key=""):  # -> [(dotted key, value)] of every *precision leaf
        if isinstance(node, dict):
            return [kv for k, v in node.items() for kv in walk(v, f"{key}.{k}" if key else str(k))]
        return [(key, node)] if key.endswith("precision") else []

    found = [(path.name, k, v) for path in CONFIGS.rglob("*.yaml")
             for k, v in walk(yaml.safe_load(path.read_text()) or {})]
    assert found, "no precision key found: the test reads the wrong folder"
    bad = [(f, k, v) for f, k, v in found if v not in ("auto", None)]
    assert not bad, bad


def test_composed_presets_default_to_auto(tmp_path):
    from tests.conftest import compose_config

    presets = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    assert "demo" in presets and "rsicd" in presets
    for experiment in presets:
        cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
        assert cfg.trainer.precision == "auto", experiment
        assert cfg.decode.precision == "auto" and cfg.val_decode.precision == "auto", experiment


def test_threads_explicit_and_auto(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == (1, "set explicitly") and torch.get_num_threads() == 1
        monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
        monkeypatch.setattr(hardware, "busy_cores", lambda: 1)
        threads, reason = set_threads(None)
        assert threads == 1 and "1 busy" in reason
        monkeypatch.setattr(hardware, "busy_cores", lambda: 0)
        assert set_threads("auto")[0] == 2
        monkeypatch.setattr(hardware, "busy_cores", lambda: 5)
        assert set_threads(None)[0] == 1  # never zero
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_this_machine():
    assert 0 <= hardware.busy_cores(interval_s=0.05) <= hardware.usable_cores()


def test_loader_workers_leave_the_compute_threads_their_cores(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    assert auto_workers(2) == 1 and auto_workers(1) == 1
    monkeypatch.setattr(hardware, "usable_cores", lambda: 1)
    assert auto_workers(1) == 0
    monkeypatch.setattr(hardware, "usable_cores", lambda: 16)
    assert auto_workers(8) == 4 and auto_workers(14) == 2


def test_training_run_records_the_resolved_precision(train_cfg, monkeypatch, tmp_path):
    from captioner.cli.train import run

    force_cpu(monkeypatch, native=False, speedup=0.01)
    cfg = train_cfg("test=false", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    with open_dict(cfg):
        cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger",
                              "save_dir": str(tmp_path), "name": "csv", "version": ""}}
    run(cfg)
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["hardware"]["precision"] == "32-true"
    assert "no native bf16" in hparams["hardware"]["precision_reason"]
