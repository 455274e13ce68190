"""`interposer demo` (what `make demo` runs): the whole chain, offline, on local Ray, in a few minutes.

    interposer demo                 # about 3-4 minutes on 2 CPU cores
    interposer demo --quick         # the reduced form the test suite runs

Stages: stand-in VAEs for v1 and xl (the real diffusers class at a tiny width, seeded, saved to a folder and
loaded by path, as a downloaded VAE is) -> `data build` on scikit-image's photographs -> `train` on 2 Ray
Train workers with checkpoints, killed on purpose once and resumed -> `eval` against the VAE round trip and a
linear baseline -> `publish --dry-run` -> `convert` a latent. The VAEs are stand-ins: the latents mean
nothing, the machinery is real. With real VAEs drop the `=FOLDER` parts (the registry's Hub defaults are used).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DEMO_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg")


def _stage(n: int, title: str) -> float:
    print(f"\n=== {n}. {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"    {what} ({time.perf_counter() - start:.1f} s)", flush=True)


def _registered_steps(run: Path) -> list[int]:
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return sorted(int(r["metrics"]["step"]) for r in snapshot["checkpoint_results"])


def run_demo(out: str | Path, quick: bool = False) -> dict[str, Path]:
    """Run every stage into `out`; returns where each artefact is."""
    import ray
    import skimage
    import torch

    from interposer.pipeline.build import BuildConfig, build, start_ray
    from interposer.pipeline.standins import make_standin_vae

    from .config import TrainConfig
    from .driver import RunSpec, train
    from .evaluate import evaluate, format_table
    from .publish import publish

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    art: dict[str, Path] = {}
    print("Latent Interposer demo: the whole chain offline on local Ray. The VAEs are STAND-INS (real diffusers "
          "classes at a tiny width, random weights): the latents mean nothing; every step is the real one.")

    t = _stage(1, "stand-in VAEs for v1 and xl, saved to folders and loaded by path")
    art["vaes"] = out / "vaes"
    vaes = {c: make_standin_vae(c, art["vaes"] / c, seed=i + 1, width=8) for i, c in enumerate(("v1", "xl"))}
    _done(t, f"{', '.join(str(p) for p in vaes.values())}")

    art["images"] = out / "images"
    art["images"].mkdir(exist_ok=True)
    data_dir = Path(skimage.__file__).parent / "data"
    photos = DEMO_PHOTOS[:5] if quick else DEMO_PHOTOS
    for name in photos:
        shutil.copy(data_dir / name, art["images"] / name)

    started = start_ray()  # local Ray, or the cluster RAY_ADDRESS names
    try:
        t = _stage(2, f"interposer data build: {len(photos)} photographs -> 128 px tiles -> v1 and xl latents")
        art["dataset"] = out / "data" / "v1-xl"
        build(BuildConfig(images=[str(art["images"])], spaces=[f"v1={vaes['v1']}", f"xl={vaes['xl']}"],
                          out=str(art["dataset"]), tile_size=128, max_tiles=6, min_size=128, shard_size=2,
                          gpus_per_worker=1 if torch.cuda.is_available() else 0))  # stand-ins: no cluster GPUs
        _done(t, f"dataset: {art['dataset']}")

        t = _stage(3, "interposer train xl -> v1 on 2 Ray Train workers, killed once on purpose and resumed")
        steps = 150 if quick else 400
        recipe = dict(src="xl", dst="v1", ch_mid=32, blocks=4, batch=16, crop=8, steps=steps, fconst=steps // 2,
                      lr=2e-3, checkpoint_every=25, eval_every=steps // 2, log_every=50, val_fraction=0.2,
                      workers=2, seed=0)
        runs = out / "runs"
        runs.mkdir(exist_ok=True)
        (runs / "demo.yaml").write_text("\n".join(f"{k}: {v}" for k, v in recipe.items() if k not in ("src", "dst")))
        cmd = [sys.executable, "-m", "interposer.trainer", "train", "--data", str(art["dataset"]), "--src", "xl",
               "--dst", "v1", "--out", str(runs), "--name", "xl-v1", "--config", str(runs / "demo.yaml")]
        run_dir = runs / "xl-v1"
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        with open(runs / "first-attempt.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            while proc.poll() is None and not _registered_steps(run_dir):
                time.sleep(0.05)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the interruption: like a preempted spot driver
                proc.wait()
                print(f"    killed the training driver (SIGKILL) after the checkpoint at step "
                      f"{max(_registered_steps(run_dir))}; rerunning the same command resumes it", flush=True)
        time.sleep(1)
        art["run"] = run_dir
        art["export"] = train(TrainConfig.of(**recipe), RunSpec(str(art["dataset"]), str(runs), "xl-v1"))
        _done(t, f"run: {run_dir} (TensorBoard: {run_dir / 'tensorboard'}); export: {art['export']}")

        t = _stage(4, "interposer eval: the interposer against the VAE round trip and a linear baseline")
        result = evaluate(str(art["export"]), str(art["dataset"]), split="all", limit=16 if quick else 32,
                          grid=art["export"] / "eval.png")
        print(format_table(result))
        art["eval_png"] = art["export"] / "eval.png"
        art["eval"] = art["export"] / "eval.json"
        art["eval"].write_text(json.dumps(result, indent=2) + "\n")
        _done(t, f"eval: {art['eval']}")
    finally:
        if started:
            ray.shutdown()

    t = _stage(5, "interposer publish --dry-run (what would go to the Hub)")
    publish(art["run"], "your-name/xl-to-v1-interposer", rev="v5.0", dry_run=True)
    _done(t, "nothing was sent")

    t = _stage(6, "interposer convert: an xl latent of a photo tile -> v1 with the trained interposer")
    import numpy as np
    import torch

    from interposer import convert
    from interposer.latent_io import write_latent
    from interposer.pipeline.encoder import TileEncoder, VAESpec
    from interposer.pipeline.images import image_tiles

    _, tiles = image_tiles((art["images"] / "astronaut.png").read_bytes(), 128, 1, 64)
    enc = TileEncoder([VAESpec("xl", str(vaes["xl"]), None, "float32")], device="cpu")
    latent = torch.from_numpy(enc.encode(tiles, ["demo"])["xl"][0].astype(np.float32))  # (1, 4, 16, 16), raw
    art["latent_xl"] = write_latent(out / "astronaut-xl.latent", latent)
    art["latent_v1"] = write_latent(out / "astronaut-v1.latent", convert(latent, "xl", "v1", weights=art["export"]))
    _done(t, f"{art['latent_xl']} -> {art['latent_v1']} (ComfyUI .latent files)")

    print(f"\nDone in {time.perf_counter() - began:.0f} s. Artefacts:")
    for k, v in art.items():
        print(f"  {k:<10} {v}")
    print("\nWith real VAEs: `interposer data build --images YOUR_PHOTOS --space v1 --space xl --out DIR` (the "
          "registry's Hub VAEs), then `interposer train --data DIR --src xl --dst v1 --out runs --name xl-v1 --gpu`; "
          "the README has the cluster walkthrough.")
    return art
