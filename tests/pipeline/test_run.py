"""Where the encoders run: the plan for each kind of cluster, the autoscaler request, the refusal when no GPU
comes; and the progress the driver prints."""

import io
import json

import pytest

from helpers import run
from interposer.pipeline.progress import Progress
from interposer.pipeline.run import ClusterUnavailable, EncoderPlan, plan_encoders, unwrap, wait_for_gpus


def test_local_ray_without_a_gpu_encodes_on_cpu_with_every_core():
    plan = plan_encoders(0, -1, {"CPU": 8}, cluster_mode=False)
    assert (plan.gpus, plan.min_workers, plan.max_workers, plan.cpus, plan.threads) == (0, 1, 1, 8, 8)
    assert not plan.wait_for_gpus and plan.device == "cpu"
    assert plan_encoders(2, -1, {"CPU": 8}, cluster_mode=False).threads == 4


def test_local_gpus_get_one_encoder_each():
    plan = plan_encoders(0, -1, {"CPU": 32, "GPU": 4}, cluster_mode=False)
    assert (plan.gpus, plan.min_workers, plan.max_workers, plan.cpus, plan.decode_threads) == (1, 4, 4, 4, 3)
    assert not plan.wait_for_gpus and plan.device == "cuda"
    assert plan_encoders(0, 0.5, {"CPU": 32, "GPU": 4}, cluster_mode=False).min_workers == 8


def test_a_cluster_with_no_gpu_yet_asks_the_autoscaler_for_gpu_actors():
    plan = plan_encoders(0, -1, {"CPU": 0}, cluster_mode=True)  # cluster.yaml: head with CPU 0, GPU workers from 0
    assert plan.wait_for_gpus and plan.gpus == 1 and (plan.min_workers, plan.max_workers) == (1, None)
    assert plan.bundles() == [{"CPU": 4.0, "GPU": 1.0}]
    fixed = plan_encoders(8, -1, {"CPU": 4, "GPU": 1}, cluster_mode=True, decode_threads=2)
    assert fixed.wait_for_gpus and fixed.bundles() == [{"CPU": 3.0, "GPU": 1.0}] * 8
    assert not plan_encoders(0, -1, {"CPU": 4, "GPU": 1}, cluster_mode=True).wait_for_gpus  # a GPU is up
    cpu = plan_encoders(0, 0, {"CPU": 16}, cluster_mode=True)  # --gpus-per-worker 0: explicitly CPU
    assert cpu.gpus == 0 and not cpu.wait_for_gpus


def test_asking_for_gpus_on_a_machine_without_one_is_refused():
    with pytest.raises(ValueError, match=r"--gpus-per-worker 1: this machine has no GPU Ray can use; "
                                         r"pass --gpus-per-worker 0"):
        plan_encoders(0, 1, {"CPU": 8}, cluster_mode=False)


def test_waiting_for_gpus_that_never_come_ends_in_one_line(ray_session):
    said = []
    plan = EncoderPlan(gpus=1.0, cpus=4.0, min_workers=1, max_workers=None, threads=1, decode_threads=3,
                       wait_for_gpus=True)
    with pytest.raises(ClusterUnavailable, match=r"no GPU joined the Ray cluster within 1 s \(asked for 1\); .*"
                                                 r"pass --gpus-per-worker 0 to encode on CPU"):
        wait_for_gpus(ray_session, plan, timeout=1, say=said.append, poll=0.2)
    assert "asked the autoscaler for 1 x {'CPU': 4.0, 'GPU': 1.0}; waiting up to 1 s" in said[0]


def test_build_on_a_cluster_without_gpus_waits_then_exits_1_writing_nothing(ray_session, photos, vaes, tmp_path):
    out = tmp_path / "out"
    result = run("-m", "interposer", "data", "build", "--images", str(photos), "--space", f"v1={vaes['v1']}",
                 "--out", str(out), "--tile-size", "64", "--gpu-wait", "1",
                 env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interposer data build: error: no GPU joined the Ray cluster within 1 s")
    assert "waiting up to 1 s" in result.stdout
    assert not out.exists()


def test_unwrap_finds_the_workers_own_error_inside_rays_wrappers():
    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    inner = OSError("cannot write x")
    assert unwrap(Wrapper(Wrapper(inner))) is inner
    assert unwrap(inner) is inner


def test_progress_prints_a_line_per_shard_with_the_bar_and_a_summary_with_the_rate():
    out = io.StringIO()
    progress = Progress(shards_total=4, stream=out)
    for shard, tiles in [(2, 12), (0, 6), (1, 0)]:
        progress.landed(shard, {"images": 2, "tiles": tiles})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("[data] shard 00002 written: 2 images, 12 tiles | [")
    assert "3/4 shards, 18 tiles" in lines[2] and "tiles/s, ETA" in lines[2]
    stats = progress.stats()
    assert (stats["tiles"], stats["shards"], stats["steady_tiles"]) == (18, 3, 6)
    assert progress.summary().startswith("this run 18 tiles in ")
    json.dumps(stats)  # plain numbers: the bench reads them
