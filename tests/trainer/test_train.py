"""Ray Train on a real local Ray session: 2 CPU workers (gloo), a dataset built by the pipeline."""

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from interposer import convert, load_interposer
from interposer.pipeline.build import BuildConfig, build
from interposer.trainer.config import TrainConfig
from interposer.trainer.driver import RunSpec, train

from helpers import TINY_TRAIN as TINY
from helpers import assert_same_export as _assert_same
from helpers import final_weights as _final
from helpers import start_train
from helpers import wait_for_checkpoint as _wait_for_checkpoint


def test_run_exports_a_loadable_interposer_and_a_rerun_does_nothing(reference, dataset, capsys):
    assert sorted(p.name for p in (reference / "export").iterdir()) == ["config.json", "model.safetensors"]
    model = load_interposer(str(reference / "export"))
    assert (model.src, model.dst, model.ch_mid, model.blocks) == ("xl", "v1", 8, 1)
    x = torch.randn(1, 4, 8, 8)
    y = convert(x, "xl", "v1", weights=reference / "export")
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)  # convert() runs channels-last
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(reference / "tensorboard"))
    board.Reload()
    rates = board.Scalars("steps_per_s")  # logged at every checkpoint (10) and log line (30)
    assert [e.step for e in rates] == [10, 20, 30, 40, 50, 60]
    assert all(e.value > 0 for e in rates)
    assert [e.step for e in board.Scalars("loss")] == [10, 20, 30, 40, 50, 60]
    before = _final(reference)
    train(TrainConfig.of(**TINY), RunSpec(str(dataset), str(reference.parent), "ref"))
    assert "already finished at step 60; nothing to do" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in _final(reference).items())


def test_v4_architecture_also_exports_the_released_layout(dataset, tmp_path):
    cfg = TrainConfig.of(**(TINY | dict(ch_mid=64, blocks=12, steps=2, checkpoint_every=2, workers=1,
                                      b_loss_weight=0.0, r_loss_weight=0.0)))
    export = train(cfg, RunSpec(str(dataset), str(tmp_path), "v4", rev="v5.0"))
    released = export / "xl-to-v1_interposer-v5.0.safetensors"
    assert released.is_file()
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(convert(x, "xl", "v1", weights=released), convert(x, "xl", "v1", weights=export))


def test_resume_with_other_settings_is_refused(reference, dataset, vaes, tmp_path):
    with pytest.raises(ValueError, match=r"exists with different settings \(lr: the run has 0.0005, you asked 0.001\)"):
        train(TrainConfig.of(**(TINY | dict(lr=1e-3))), RunSpec(str(dataset), str(reference.parent), "ref"))
    other = tmp_path / "other-data"
    build(BuildConfig(images=[str(Path(json.loads((dataset / "manifest.json").read_text())["sources"][0]))],
                      spaces=[f"v1={vaes['v1']}", f"xl={vaes['xl']}"], out=str(other), tile_size=64, max_tiles=3,
                      min_size=64, shard_size=2, quiet=True))
    with pytest.raises(ValueError, match=r"--data: the run was trained on .*xl-v1"):
        train(TrainConfig.of(**TINY), RunSpec(str(other), str(reference.parent), "ref"))


def _write_tiny_yaml(runs: Path) -> None:
    import yaml

    runs.mkdir(parents=True, exist_ok=True)
    (runs / "tiny.yaml").write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k not in ("src", "dst")}))


# A Ray Train worker lost mid-run (its node with it), and the driver lost, on a 3-node cluster in S3:
# tests/trainer/test_s3_cluster.py::test_train_in_s3_on_two_nodes_survives_a_lost_node_and_a_lost_driver.
@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_resumes_bit_exactly(reference, dataset, ray_session, tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_tiny_yaml(runs)
    cfg = TrainConfig.of(**TINY)
    proc = start_train(runs, "killed-driver", ray_session, "--data", str(dataset), "--src", "xl", "--dst", "v1",
                       "--config", str(runs / "tiny.yaml"))
    steps = _wait_for_checkpoint(runs / "killed-driver", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(steps) < TINY["steps"], "the kill should land mid-run"
    assert not (runs / "killed-driver" / "export").exists()
    capsys.readouterr()
    train(cfg, RunSpec(str(dataset), str(runs), "killed-driver"))
    out = capsys.readouterr().out
    resumed = re.search(r"resumed from step (\d+)", out)
    assert "(resuming)" in out and resumed and int(resumed.group(1)) >= max(steps), out
    _assert_same(runs / "killed-driver", reference)


@pytest.mark.parametrize("argv, message", [
    (["--src", "xl", "--dst", "v9"], "unknown latent space 'v9'"),
    (["--src", "xl", "--dst", "wan"], "has no wan latents; it has v1, xl"),
    (["--src", "xl", "--dst", "v1", "--config", "BADYAML"], "not valid YAML"),
    (["--src", "xl", "--dst", "v1", "--config", "UNKNOWNKEY"], "unknown key(s) stepz"),
    (["--src", "xl", "--dst", "v1", "--batch", "7", "--workers", "2"], "batch 7 must divide evenly over 2 workers"),
    (["--src", "xl", "--dst", "v1", "--crop", "32"], "--crop 32 is larger than the xl latents of"),
    (["--src", "xl", "--dst", "v1", "--crop", "4", "--val-fraction", "0.999999999"], "holds out every image of"),
])  # fmt: skip
def test_cli_mistakes_exit_2_and_write_nothing(argv, message, dataset, tmp_path):
    from helpers import run

    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    (tmp_path / "unknown.yaml").write_text("stepz: 1\n")
    argv = [a.replace("BADYAML", str(tmp_path / "bad.yaml")).replace("UNKNOWNKEY", str(tmp_path / "unknown.yaml"))
            for a in argv]
    result = run("-m", "interposer", "train", "--data", str(dataset), "--out", str(tmp_path / "runs"),
                 "--name", "x", *argv, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_train_without_a_dataset_is_one_line(tmp_path):
    from helpers import run

    missing = run("-m", "interposer", "train", "--data", str(tmp_path / "nodata"), "--src", "xl", "--dst", "v1",
                  "--out", str(tmp_path / "runs"), "--name", "x")
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr and not (tmp_path / "runs").exists()


def test_a_validation_share_with_no_image_trains_without_validation_in_one_warning(dataset):
    from interposer.pipeline.schema import read_manifest
    from interposer.trainer.driver import _check_data

    manifest = read_manifest(str(dataset))
    with pytest.warns(UserWarning, match=r"^--val-fraction 1e-09: no image of .* \(5 images\) falls in the validation "
                                         r"share; training without validation"):
        assert _check_data(TrainConfig.of(**(TINY | dict(val_fraction=1e-9))), str(dataset), manifest) is False


@pytest.mark.slow
def test_two_workers_evaluating_every_3_steps_with_a_real_validation_split_finish(ray_session, dataset, tmp_path):
    """Evaluation used to exist on rank 0 only and decided a collective: with --eval-every 3 (not a multiple of the
    log interval) rank 0 alone entered an all_reduce and both workers waited forever."""
    import hashlib

    import pyarrow.parquet as pq
    import yaml

    from helpers import run

    ids = [r["image_id"] for r in pq.read_table(dataset / "images").to_pylist() if r["tiles"]]
    h = sorted(int.from_bytes(hashlib.sha256(f"val:{i}".encode()).digest()[:8], "little") / 2**64 for i in ids)
    fraction = (h[0] + h[1]) / 2  # exactly one image held out (trainer.data.is_validation)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: TINY[k] for k in ("ch_mid", "blocks", "checkpoint_every", "log_every")}))
    result = run("-m", "interposer", "train", "--data", str(dataset), "--src", "xl", "--dst", "v1", "--out",
                 str(tmp_path / "runs"), "--name", "ddp-eval", "--config", str(config), "--steps", "12", "--batch",
                 "8", "--crop", "4", "--workers", "2", "--eval-every", "3", "--val-fraction", f"{fraction:.12f}",
                 env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "step 12/12" in result.stdout and "val L1" in result.stdout
    assert (tmp_path / "runs" / "ddp-eval" / "export" / "model.safetensors").is_file()
