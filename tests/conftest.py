"""Shared fixtures. Tests never reach the network: HF_HUB_OFFLINE=1 before huggingface_hub is imported."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import REFERENCE, V4_LAYOUT, reference_pairs  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The reference checkpoints under the released file names ({pair}_interposer-v4.0.safetensors), as a
    user downloads them, with their {pair}_io.safetensors; a released-layout file's width and blocks are
    read from its tensors, so these load exactly as city96's 64-wide files do."""
    folder = tmp_path_factory.mktemp("reference")
    for pair in reference_pairs():
        shutil.copy(REFERENCE / f"{pair}_interposer-w16b2.safetensors", folder / f"{pair}_interposer-v4.0.safetensors")
        shutil.copy(REFERENCE / f"{pair}_io.safetensors", folder / f"{pair}_io.safetensors")
    return folder


@pytest.fixture(scope="session")
def layout() -> dict:
    return json.loads(V4_LAYOUT.read_text())


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each test gets an empty $INTERPOSER_HOME and Hub cache, and convert()'s model cache starts empty."""
    home = tmp_path / "interposer-home"
    home.mkdir()
    monkeypatch.setenv("INTERPOSER_HOME", str(home))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    from interposer import clear_cache

    clear_cache()
    yield home
    clear_cache()


@pytest.fixture
def ref_io(reference):
    """pair -> (input, output) tensors of the reference network."""
    from safetensors.torch import load_file

    def get(pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        io = load_file(str(reference / f"{pair}_io.safetensors"))
        return io["input"], io["output"]

    return get


# ----------------------------------------------------- shared by the pipeline and trainer tests

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # as pipeline.build.start_ray() runs local Ray
    # "local": never the cluster Ray last recorded on the machine (the `cluster` fixture records its head)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Real photographs that scikit-image ships (256-640 px)."""
    import skimage

    folder = tmp_path_factory.mktemp("photos")
    data = Path(skimage.__file__).parent / "data"
    for name in SKIMAGE_PHOTOS:
        shutil.copy(data / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def vaes(tmp_path_factory) -> dict[str, Path]:
    """Stand-in VAEs (real diffusers classes, tiny widths), saved to folders like a downloaded VAE."""
    from interposer.pipeline.standins import make_standin_vae

    root = tmp_path_factory.mktemp("vaes")
    return {code: make_standin_vae(code, root / code, seed=i) for i, code in
            enumerate(("v1", "xl", "v3", "fx", "fx2", "wan", "ca"))}


# ----------------------------------------------------- a real S3 server and a real multi-node Ray cluster

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback with the bucket BUCKET; stopped by its pid at the end."""
    from clusters import BUCKET
    from seaweed import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        server.bucket(BUCKET)
        yield server
    assert server.proc.poll() is not None, "the S3 server still runs after its stop"


@pytest.fixture(scope="module")
def cluster(s3):
    """A three-node Ray cluster on this machine (a head with no CPUs, as cluster.yaml's, and two one-CPU worker
    nodes, each its own raylet and object store), every node with the S3 settings in its environment."""
    from clusters import RAY_ENV, environment, node_ports, node_processes, still_running

    from ray.cluster_utils import Cluster

    c = Cluster(shutdown_at_exit=False)
    c.removed = {}  # {pid: start time} of the nodes tests removed (clusters.remove_node): checked gone too
    try:
        with environment({**s3.env, **RAY_ENV}):
            from seaweed import free_port

            # the head: no CPUs, and the dashboard with its Jobs API (`ray job submit`), as cluster.yaml's
            c.add_node(num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
                       **node_ports())
            for _ in range(2):
                c.add_node(num_cpus=1, **node_ports())
            c.wait_for_nodes()
        yield c
    finally:
        ours = {**c.removed, **node_processes(*(n for n in (c.head_node, *c.worker_nodes) if n is not None))}
        c.shutdown()  # every process of every node, by the pids the Cluster started
        left = still_running(ours)
        assert not left, f"{len(left)} of the cluster's {len(ours)} processes still run after its shutdown: {left}"
