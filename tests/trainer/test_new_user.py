"""What a new user hit: aborts at exit, tracebacks where one line is promised, run names that are paths, files
others cannot read, misleading messages, a build of only bad files, a Hub that cannot be reached, Ctrl-C, a
closed pipe. Every command here runs in its own process, as a user runs it."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from helpers import TINY_TRAIN as TINY
from helpers import run


def _one_line(result, rc: int, text: str) -> None:
    assert result.returncode == rc, (result.returncode, result.stdout[-1500:], result.stderr[-1500:])
    assert len(result.stderr.strip().splitlines()) == 1 and text in result.stderr, result.stderr


@pytest.mark.slow
def test_commands_that_read_a_dataset_exit_cleanly_every_time(dataset, reference, tmp_path):
    """The process used to abort at exit now and then (SIGABRT, status 134: Arrow's pool threads released
    buffers over Python bytes, taking the GIL while the interpreter ended): 12 clean exits of each reader of
    Parquet, 4 of each train command (they read the same files through the same DatasetFiles)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k not in ("src", "dst")}))
    common = ["--data", str(dataset), "--src", "xl", "--dst", "v1", "--out", str(reference.parent), "--config",
              str(config)]
    commands = {
        "inspect": ["-m", "interposer", "data", "inspect", str(dataset)],
        "inspect_dataset()": ["-c", f"from interposer.pipeline.inspection import inspect_dataset; "
                                    f"inspect_dataset({str(dataset)!r})"],
        "train, finished": ["-m", "interposer", "train", *common, "--name", reference.name],
        "train, refused": ["-m", "interposer", "train", *common, "--name", reference.name, "--seed", "7"],
    }
    expected = {"inspect": 0, "inspect_dataset()": 0, "train, finished": 0, "train, refused": 2}
    repeats = {"inspect": 12, "inspect_dataset()": 12, "train, finished": 4, "train, refused": 4}  # Arrow reads
    jobs = [(name, argv) for name, argv in commands.items() for _ in range(repeats[name])]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: (job[0], run(*job[1])), jobs))
    for name, result in results:
        assert result.returncode == expected[name], (name, result.returncode, result.stderr[-800:])
        assert "terminate called" not in result.stderr, (name, result.stderr[-800:])
    finished = next(r for n, r in results if n == "train, finished")
    assert "already finished" in finished.stdout


def test_every_device_flag_is_checked_in_one_line(tmp_path):
    for device, text in (("banana", "--device 'banana' is not a device"), ("cuda", "--device cuda: no CUDA GPU")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        result = run("-m", "interposer", "eval", "--model", str(tmp_path), "--data", str(tmp_path), "--device", device)
        _one_line(result, 2, text)


def test_a_run_name_is_a_name(dataset, tmp_path):
    out = tmp_path / "runs"
    for name in ("../escape", "a/b", ".hidden", ""):
        result = run("-m", "interposer", "train", "--data", str(dataset), "--src", "xl", "--dst", "v1", "--out",
                     str(out), "--name", name, "--steps", "1")
        _one_line(result, 2, "a run name is a name, not a path")
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_written_files_are_readable_by_others_as_open_would_make_them(tmp_path):
    from interposer import InterposerModel, save_interposer
    from interposer.latent_io import write_latent
    from interposer.pipeline.store import Store

    mask = os.umask(0o022)
    try:
        save_interposer(InterposerModel(ch_mid=8, blocks=1), tmp_path / "export", "xl", "v1")
        write_latent(tmp_path / "out.safetensors", torch.zeros(1, 4, 8, 8))
        Store(tmp_path / "data").write_bytes("manifest.json", b"{}")
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(mask)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o644
    for path in (tmp_path / "export" / "model.safetensors", tmp_path / "export" / "config.json",
                 tmp_path / "out.safetensors", tmp_path / "data" / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_messages_name_what_to_fix(dataset, tmp_path):
    from interposer.pipeline.standins import write_synthetic_dataset

    for flags, text in ((["--limit", "-1"], "--limit -1: give a number of tiles, or 0 for all"),
                        (["--val-fraction", "2"], "--val-fraction 2.0: a share of images in [0, 1)")):
        result = run("-m", "interposer", "eval", "--model", str(tmp_path), "--data", str(dataset), *flags)
        _one_line(result, 2, text)
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")
    latent = tmp_path / "in.safetensors"
    from safetensors.torch import save_file

    save_file({"samples": torch.zeros(1, 4, 8, 8)}, str(latent))
    result = run("-m", "interposer", "convert", str(latent), str(tmp_path / "out.safetensors"), "--src", "xl",
                 "--dst", "v1", "--weights", str(picture))
    _one_line(result, 2, "not a weights file; give an interposer's .safetensors file or its folder")
    result = run("-m", "interposer", "convert", str(latent), str(tmp_path / "out.safetensors"), "--src", "xl",
                 "--dst", "v1", env={"INTERPOSER_HOME": str(tmp_path / "home")})
    _one_line(result, 2, "--weights PATH on the command line")
    empty = write_synthetic_dataset(tmp_path / "empty", 0)
    result = run("-m", "interposer", "train", "--data", str(empty), "--src", "xl", "--dst", "v1", "--out",
                 str(tmp_path / "runs"), "--name", "e", "--steps", "1")
    _one_line(result, 2, "holds no tiles")


def test_an_unreachable_hub_is_one_line_and_exit_1(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "INTERPOSER_HOME": str(tmp_path / "h")}
    from safetensors.torch import save_file

    save_file({"samples": torch.zeros(1, 4, 8, 8)}, str(tmp_path / "in.safetensors"))
    result = run("-m", "interposer", "convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                 "--src", "xl", "--dst", "v1", env=env)
    _one_line(result, 1, "cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "xl-to-v1_interposer-v4.0.safetensors" in result.stderr and not (tmp_path / "out.safetensors").exists()
    from interposer import InterposerModel, save_interposer

    save_interposer(InterposerModel(ch_mid=8, blocks=1), tmp_path / "run" / "export", "xl", "v1")
    result = run("-m", "interposer", "publish", "--model", str(tmp_path / "run"), "--repo", "me/x",
                 env=dict(env, HF_TOKEN="hf_secret_do_not_print"))
    assert result.returncode == 1 and "cannot reach the Hugging Face Hub" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "hf_secret_do_not_print" not in result.stdout + result.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); from interposer.cli import main; "
            "sys.exit(main(['list']))")
    result = run("-c", code)
    assert result.returncode == 141 and result.stderr == "", result.stderr


def test_ctrl_c_during_a_build_is_one_line_and_nothing_half_written(photos, vaes, ray_session, tmp_path):
    out = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "interposer", "data", "build", "--images", str(photos), "--space",
                             f"v1={vaes['v1']}", "--out", str(out), "--tile-size", "64", "--shard-size", "1",
                             "--gpus-per-worker", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 120
    while not (out / "manifest.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert stderr.strip().splitlines()[-1].endswith("interrupted; rerun the same command to resume"), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not list(out.rglob("*.tmp")) and json.loads((out / "manifest.json").read_text())["complete"] is False
