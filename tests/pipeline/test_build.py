"""The Ray Data build on a real local Ray session, real photographs and stand-in VAEs of the real classes."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import run
from interposer.pipeline.build import AddSpaceConfig, BuildConfig, add_space, build, inspect_dataset
from interposer.pipeline.encoder import TileEncoder, VAESpec
from interposer.pipeline.rows import cut_one
from interposer.pipeline.schema import Manifest, read_latents

TILE = 64


@pytest.fixture(scope="module")
def sources(tmp_path_factory, photos) -> Path:
    """The photographs plus what real folders hold: a duplicate, junk and broken files."""
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(photos, root / "photos")
    bad = root / "photos" / "misc"
    bad.mkdir()
    shutil.copy(photos / "coffee.png", bad / "COFFEE-copy.PNG")  # same bytes, another name: encoded once
    data = (photos / "rocket.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    (bad / "dot.png").write_bytes(buf.getvalue())
    return root / "photos"


def _cfg(sources, vaes, out, spaces=("v1", "xl"), **kw) -> BuildConfig:
    kw = dict(tile_size=TILE, max_tiles=3, min_size=100, shard_size=2, quiet=True) | kw
    return BuildConfig(images=[str(sources)], spaces=[f"{s}={vaes[s]}" for s in spaces], out=str(out), **kw)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(ray_session, sources, vaes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "data"
    build(_cfg(sources, vaes, out))
    return out


def test_build_writes_aligned_latents_with_reasons_for_every_skip(clean, sources, vaes):
    manifest = Manifest.from_json((clean / "manifest.json").read_text())
    assert manifest.complete and set(manifest.spaces) == {"v1", "xl"}
    c = manifest.counts
    assert (c["listed"], c["unique_images"], c["duplicates"], c["images_ok"]) == (10, 9, 1, 5)
    assert c["skipped"] == {"corrupt": 2, "not_an_image": 1, "too_small": 1}
    assert c["tiles"] == 15 and manifest.shards == 5
    for code, entry in manifest.spaces.items():
        assert entry.tiles == 15 and entry.latent_shape == [4, TILE // 8, TILE // 8]
        assert entry.fingerprint.startswith("sha256:") and entry.dtype == "float32"
        assert entry.vae == str(vaes[code])

    # plain pyarrow, no Ray: tiles and every space's latents align row for row
    tiles = pq.read_table(clean / "tiles").to_pylist()
    for code in ("v1", "xl"):
        table = pq.read_table(clean / "latents" / code)
        assert table.column("tile_key").to_pylist() == [t["tile_key"] for t in tiles]
        assert str(table.schema.field("latent").type).startswith("extension<arrow.fixed_shape_tensor")
        assert read_latents(table).shape == (15, 4, TILE // 8, TILE // 8)

    # a tile re-derived from its source and encoded directly gives the stored latent
    t = tiles[4]
    row = cut_one(t["uri"], t["image_id"], TILE, 3, 100)
    assert json.loads(row["boxes"])[json.loads(row["indices"]).index(t["tile_index"])] == t["box"]
    pixels = np.frombuffer(row["pixels"], np.uint8).reshape(-1, TILE, TILE, 3)
    enc = TileEncoder([VAESpec("xl", str(vaes["xl"]), None, "float32")], device="cpu", batch_size=6)
    keys = [f"{t['image_id']}-{i:02d}" for i in json.loads(row["indices"])]
    direct = enc.encode(pixels, keys)["xl"][0][json.loads(row["indices"]).index(t["tile_index"])]
    stored = read_latents(pq.read_table(clean / "latents" / "xl"))[4]
    assert np.array_equal(direct, stored)

    images = pq.read_table(clean / "images").to_pylist()
    by_name = {Path(r["uri"]).name: r["status"] for r in images}
    assert by_name["truncated.jpg"] == "corrupt" and by_name["dot.png"] == "too_small"
    assert "COFFEE-copy.PNG" not in by_name and by_name["coffee.png"] == "ok"  # the first URI in sort order


def test_same_command_same_bytes_and_rerun_does_nothing(clean, sources, vaes, tmp_path, capsys):
    out = tmp_path / "again"
    build(_cfg(sources, vaes, out))
    assert _digest(out) == _digest(clean)
    before = _digest(out)
    build(_cfg(sources, vaes, out, quiet=False))
    assert "is complete (15 tiles); nothing to do" in capsys.readouterr().out
    assert _digest(out) == before


def test_rerun_with_other_settings_is_refused(clean, sources, vaes, tmp_path):
    before = _digest(clean)
    with pytest.raises(ValueError, match=r"holds a different dataset \(tile_size: dataset has 64, you asked 128; "
                                         r"spaces: dataset has v1, xl, you asked fx, v1\).*add-space"):
        build(_cfg(sources, vaes, clean, spaces=("v1", "fx"), tile_size=128))
    assert _digest(clean) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no manifest.json"):
        build(_cfg(sources, vaes, other))


def test_add_space_leaves_existing_files_untouched(clean, vaes, tmp_path):
    data = tmp_path / "grow"
    shutil.copytree(clean, data)
    before = _digest(data)
    manifest = add_space(AddSpaceConfig(data=str(data), space=f"fx={vaes['fx']}", quiet=True))
    after = _digest(data)
    assert {k: after[k] for k in before if k != "manifest.json"} == {k: v for k, v in before.items()
                                                                      if k != "manifest.json"}
    assert manifest.spaces["fx"].tiles == 15 and manifest.complete
    fx = pq.read_table(data / "latents" / "fx")
    assert fx.column("tile_key").to_pylist() == pq.read_table(data / "tiles").column("tile_key").to_pylist()
    assert read_latents(fx).shape == (15, 16, TILE // 8, TILE // 8)
    # the same latents as building with fx from the start
    full = tmp_path / "full"
    build(_cfg(Path(Manifest.from_json((clean / "manifest.json").read_text()).sources[0]), vaes, full,
               spaces=("v1", "xl", "fx")))
    assert _digest(full / "latents" / "fx") == _digest(data / "latents" / "fx")
    # the same space again from another VAE (another stand-in of v1's class): refused, naming what differs
    before = _digest(data)
    with pytest.raises(ValueError, match=r"already has v1 from another VAE \(v1 vae: dataset has .* v1 fingerprint: "):
        add_space(AddSpaceConfig(data=str(data), space=f"v1={vaes['xl']}", quiet=True))
    assert _digest(data) == before


def test_inspect_reports_per_channel_statistics(clean):
    info = inspect_dataset(str(clean))
    lat = read_latents(pq.read_table(clean / "latents" / "v1")).astype(np.float64)
    np.testing.assert_allclose(info["stats"]["v1"]["mean"], lat.mean(axis=(0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(info["stats"]["v1"]["std"], lat.std(axis=(0, 2, 3)), atol=1e-4)
    result = run("-m", "interposer", "data", "inspect", str(clean))
    assert result.returncode == 0, result.stderr
    assert "5 used, 15 tiles of 64 px in 5 shards" in result.stdout
    assert "skipped: corrupt 2, not_an_image 1, too_small 1" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["data", "build", "--images", "IMGS", "--space", "v9", "--out", "OUT"], "unknown latent space 'v9'"),
    (["data", "build", "--images", "/no/such/dir", "--space", "v1", "--out", "OUT"], "image source not found"),
    (["data", "build", "--images", "IMGS", "--space", "v1", "--out", "OUT", "--tile-size", "100"],
     "--tile-size must be a multiple of 64"),
    (["data", "add-space", "--data", "IMGS", "--space", "fx"], "no manifest.json; not a dataset"),
    (["data", "inspect", "/no/such/data"], "no manifest.json"),
])  # fmt: skip
def test_cli_mistakes_exit_2_and_write_nothing(argv, message, sources, tmp_path, capsys, monkeypatch):
    from interposer.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = [a.replace("IMGS", str(sources)).replace("OUT", str(tmp_path / "out")) for a in argv]
    capsys.readouterr()
    code, err = main(argv), capsys.readouterr().err  # in this process: each mistake is refused before Ray starts
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_and_a_build_with_no_tiles_fails(sources, vaes, ray_session, tmp_path):
    afile = tmp_path / "out.txt"
    afile.write_text("keep me")
    result = run("-m", "interposer", "data", "build", "--images", str(sources), "--space", f"v1={vaes['v1']}",
                 "--out", str(afile), env={"RAY_ADDRESS": ""})
    assert result.returncode == 2 and "--out " + str(afile) + " is a file; give a folder" in result.stderr
    assert afile.read_text() == "keep me"
    result = run("-m", "interposer", "data", "build", "--images", str(sources), "--space", f"v1={vaes['v1']}",
                 "--out", str(tmp_path / "empty"), "--tile-size", "64", "--min-size", "100000",
                 "--gpus-per-worker", "0", env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    # nothing usable was made: the input was the user's (exit 2), one line naming skipped files and why, no dataset
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.strip().splitlines() if "error:" in line]  # (and Ray's notice)
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    last = errors[0]
    assert re.search(r"error: no tiles from \d+ listed files \(skipped: .*too_small \d+; e\.g\. .*\.\w+ \(too_small\)",
                     last), last
    assert "nothing was kept in" in last and not (tmp_path / "empty").exists()


def test_a_failed_write_on_a_worker_names_the_file_leaves_nothing_half_written_and_a_rerun_recovers(
        clean, sources, vaes, tmp_path):
    from interposer.pipeline.store import StoreWriteError

    # A finished dataset with shard 3's xl latents and images file gone, and a folder where the xl file must
    # go: the worker that rewrites shard 3 fails mid-shard (after its v1 latents) as on a full disk.
    out = tmp_path / "data"
    shutil.copytree(clean, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    (out / "images" / "part-00003.parquet").unlink()
    (out / "latents" / "xl" / "part-00003.parquet").unlink()
    (out / "latents" / "xl" / "part-00003.parquet").mkdir()
    with pytest.raises(StoreWriteError, match=r"cannot write .*/latents/xl/part-00003\.parquet: Is a directory; "
                                              r"nothing half-written was left"):
        build(_cfg(sources, vaes, out))
    assert not list(out.rglob("*.tmp")) and not (out / "images" / "part-00003.parquet").exists()
    for part in out.rglob("part-*.parquet"):
        if part.is_file():
            pq.read_table(part)  # every file under its real name is complete
    (out / "latents" / "xl" / "part-00003.parquet").rmdir()
    build(_cfg(sources, vaes, out))
    assert _digest(out) == _digest(clean)


def test_local_ray_runs_workers_at_the_commands_priority(tmp_path):
    # Ray's default renices workers to 15; start_ray() keeps them at the driver's own priority unless the
    # user sets RAY_worker_niceness. Run under `nice -n 2` so "inherited" and "reniced" differ from 0.
    script = (
        "import os, ray\n"
        "from interposer.pipeline.build import start_ray\n"
        "nice = ray.remote(lambda: os.nice(0))\n"
        "assert start_ray() and not start_ray()\n"  # the second call finds Ray running
        "print('default', os.nice(0), ray.get(nice.remote()))\n"
        "ray.shutdown()\n"
        "os.environ['RAY_worker_niceness'] = '15'\n"
        "start_ray()\n"
        "print('override', os.nice(0), ray.get(nice.remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    result = subprocess.run(["nice", "-n", "2", sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("default", "override")))
    driver, worker = map(int, lines["default"].split())
    assert driver == 2 and worker == 2
    driver, worker = map(int, lines["override"].split())
    assert driver == 2 and worker > 2


def _synthetic_images(folder: Path, n: int, side: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.linspace(0, 255, side * side * 3).reshape(side, side, 3)
        Image.fromarray((base + rng.integers(0, 60, (side, side, 3))).clip(0, 255).astype(np.uint8)).save(
            folder / f"img-{i:03d}.png")
    return folder


@pytest.mark.slow
def test_sigkill_at_every_stage_keeps_finished_shards_and_the_rerun_is_identical(ray_session, tmp_path):
    """The build SIGKILLed (with its process group) at each stage in turn, each run going on from the last: while
    starting, once the manifest is written (indexing), at its first shard, past half the shards. Kills are placed by
    polling files, not by timing, so they land at the same stage on any machine."""
    from interposer.pipeline.standins import make_standin_vae

    # wider stand-ins and 128 px tiles: a shard takes a visible fraction of a second, so the kills land mid-build
    wide = {c: make_standin_vae(c, tmp_path / f"vae-{c}", seed=i, width=32) for i, c in enumerate(("v1", "xl"))}
    images = _synthetic_images(tmp_path / "images", 24, 256)
    kw = dict(tile_size=128, max_tiles=4, min_size=64, shard_size=2, gpus_per_worker=0, quiet=True)
    build(BuildConfig(images=[str(images)], spaces=[f"{c}={p}" for c, p in wide.items()],
                      out=str(tmp_path / "reference"), **kw))
    shards = Manifest.from_json((tmp_path / "reference" / "manifest.json").read_text()).shards
    assert shards == 12

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "interposer.pipeline", "build", "--images", str(images), "--out", str(out),
           "--tile-size", "128", "--max-tiles", "4", "--min-size", "64", "--shard-size", "2", "--gpus-per-worker", "0"]
    cmd += [a for c, p in wide.items() for a in ("--space", f"{c}={p}")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = lambda: len(list(out.glob("images/part-*.parquet")))  # noqa: E731
    stages = {"starting": lambda t0: time.time() - t0 > 0.5, "indexing": lambda t0: (out / "manifest.json").exists(),
              "first shard": lambda t0: done() >= 1, "past half": lambda t0: done() > shards // 2}
    for stage, reached in stages.items():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        t0, deadline = time.time(), time.time() + 240
        try:
            while time.time() < deadline and proc.poll() is None and not reached(t0):
                time.sleep(0.02)
        finally:
            alive = proc.poll() is None
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert alive and reached(t0), f"the kill '{stage}' should land mid-build ({done()} of {shards} shards)"
    assert done() < shards
    for images_file in sorted(out.glob("images/part-*.parquet")):  # each shard marked done is whole
        name = images_file.name
        tiles = pq.read_table(out / "tiles" / name).num_rows
        assert tiles == sum(pq.read_table(images_file).column("tiles").to_pylist())
        assert all(pq.read_table(out / "latents" / c / name).num_rows == tiles for c in wide)
    build(BuildConfig(images=[str(images)], spaces=[f"{c}={p}" for c, p in wide.items()], out=str(out), **kw))
    assert _digest(out) == _digest(tmp_path / "reference")
    assert not list(out.rglob("*.tmp"))


def test_every_registry_space_builds_with_a_stand_in_of_its_class(ray_session, photos, vaes, tmp_path):
    from interposer.spaces import SPACES

    codes = [s.code for s in SPACES]
    manifest = build(BuildConfig(images=[str(photos)], spaces=[f"{c}={vaes[c]}" for c in codes],
                                 out=str(tmp_path / "all"), tile_size=TILE, max_tiles=1, min_size=100, shard_size=8,
                                 quiet=True))
    assert manifest.counts["tiles"] == 5
    keys = pq.read_table(tmp_path / "all" / "tiles").column("tile_key").to_pylist()
    for space in SPACES:
        entry = manifest.spaces[space.code]
        assert entry.fingerprint.startswith("sha256:") and entry.vae_class == space.vae_class
        table = pq.read_table(tmp_path / "all" / "latents" / space.code)
        assert table.column("tile_key").to_pylist() == keys
        side = TILE // space.factor  # ca: 4x, the rest 8x
        assert read_latents(table).shape == (5, space.channels, side, side), space.code
        assert np.isfinite(read_latents(table)).all()
