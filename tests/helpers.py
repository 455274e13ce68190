"""Helpers the tests import (conftest.py is not importable under --import-mode=importlib)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# Copied from shared/reference (the suite reads nothing outside the repository): city96's v4.0 network and key
# layout at width 16 with 2 blocks, with reference outputs; v4_layout.json lists every key and shape of the
# released 64-wide, 12-block files.
REFERENCE = ROOT / "tests" / "reference" / "city96-v4-small"
V4_LAYOUT = ROOT / "tests" / "reference" / "v4_layout.json"


def reference_pairs() -> list[str]:
    """Every 'src-to-dst' with a reference checkpoint."""
    return sorted(json.loads((REFERENCE / "pairs.json").read_text()))


def reference_args(pair: str) -> dict:
    """The reference network's constructor arguments."""
    args = json.loads((REFERENCE / "pairs.json").read_text())[pair]
    return {k: args[k] for k in ("ch_in", "ch_out", "ch_mid", "blocks", "scale")}


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python *args` in a fresh process, offline, and capture its output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=300)


# A tiny training recipe for tests: 2 CPU workers, 60 steps, checkpoints every 10, both v1->xl-style losses.
TINY_TRAIN = dict(src="xl", dst="v1", ch_mid=8, blocks=1, batch=8, crop=4, steps=60, fconst=40, checkpoint_every=10,
                  eval_every=30, log_every=30, val_fraction=0.2, workers=2, b_loss_weight=1.0, r_loss_weight=1.4,
                  max_failures=3)


# ----------------------------------------------------- training runs: their final weights, their checkpoints


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def assert_same_export(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def registered_steps(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (written *and* recorded in its snapshot): only
    those are resumed from, so a kill must come after one."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return sorted(int(r["metrics"]["step"]) for r in snapshot["checkpoint_results"])


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 180) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = registered_steps(run)
        if steps:
            return steps
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint appeared (exit code {proc.poll()})")


def start_train(runs: Path, name: str, ray_session, *argv: str) -> subprocess.Popen:
    """`interposer train ... --out RUNS --name NAME` as its own process group on the test's Ray session, its
    output in RUNS/NAME.log: a driver a test can SIGKILL by its pid."""
    cmd = [sys.executable, "-m", "interposer", "train", *argv, "--out", str(runs), "--name", name]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with open(runs / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
