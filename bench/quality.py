"""The real-pair quality benchmark: real VAEs, real photos, held-out photos, end to end through the product.

    python bench/quality.py --vaes ../shared/vaes                  # ~15 min on 2 CPU cores
    python bench/quality.py --vaes ../shared/vaes --steps 200 --work /tmp/q   # a shorter trial

`--vaes` is a folder holding `taef2/` (Flux.2's latent space, with a decoder) and `taesana/` (Sana's DC-AE
space, /32, encoder only): VAEs with their own code, loaded with --trust-remote-code. Photos are the real ones
scikit-image ships (nothing of them is in git). Three of them (chelsea, coffee, rocket) are held out: never
trained on, they are the test set (crops at two scales). The others are cut into 256 px crops at four scales,
plain and mirrored, the colour ones also with their RGB channels rotated (more colours to learn from).

Stages, each the `interposer` command a user runs (in this process, through its `main`):
    data build   train crops and test crops -> two datasets, both VAEs (fx2 = taef2, sana = taesana)
    train        fx2 -> sana and sana -> fx2, --steps of --batch whole 256 px tiles, the pair's default network
    eval         on the held-out photos' tiles, the linear map fitted on the training dataset

It prints the table (VAE round trip, linear map, interposer; both directions; latent L1 for -> sana, decoded
PSNR against the original photo for -> fx2, where taef2 decodes) with each stage's wall time, how many held-out
tiles the interposer beats linear on, and writes the eval grids (eval.png) beside each run's eval.json.
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
TEST_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
TILE = 256


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


def write_photos(folder: Path, names: tuple[str, ...], scales, stride: int, mirror: bool, recolour: bool) -> int:
    """Crops of the photos as PNG files, one image a crop. `recolour`: colour photos also with their RGB channels
    rotated (GBR, BRG): half of scikit-image's photos are grey, and colour is what a conversion gets wrong."""
    import skimage
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = Path(skimage.__file__).parent / "data"
    n = 0
    for name in names:
        photo = Image.open(data / name)
        image = np.asarray(photo.convert("RGB"))
        variants = [image] + ([image[..., [1, 2, 0]], image[..., [2, 0, 1]]] if recolour and photo.mode == "RGB" else [])
        for v, im in enumerate(variants):
            for i, tile in enumerate(crops(im, scales, stride, mirror)):
                Image.fromarray(np.ascontiguousarray(tile)).save(folder / f"{Path(name).stem}-{v}-{i:03d}.png")
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
    parser.add_argument("--steps", type=int, default=600, help="training steps per direction (default 600)")
    parser.add_argument("--batch", type=int, default=16, help="batch of whole 256 px tiles (default 16)")
    parser.add_argument("--arch", default=None, help="network (default: the pair's default); e.g. v4")
    parser.add_argument("--extra", default="", help="more `interposer train` flags, quoted (e.g. '--lr 1e-3')")
    parser.add_argument("--tag", default="", help="suffix of the run names, to keep variants side by side")
    args = parser.parse_args()
    vaes, work = Path(args.vaes).resolve(), Path(args.work).resolve()
    for sub in ("taef2", "taesana"):
        if not (vaes / sub / "config.json").is_file():
            sys.exit(f"--vaes {vaes}: no {sub}/config.json there")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    times = {}
    spaces = ["--space", f"fx2={vaes / 'taef2'}", "--space", f"sana={vaes / 'taesana'}", "--trust-remote-code"]
    for split, names, scales, stride, train in (("train", TRAIN_PHOTOS, (1.0, 0.75, 0.55, 0.4), 128, True),
                                                ("test", TEST_PHOTOS, (1.0, 0.75), 96, False)):
        data = work / f"data-{split}"
        if not (data / "manifest.json").is_file():
            n = write_photos(work / f"photos-{split}", names, scales, stride, mirror=train, recolour=train)
            print(f"{split}: {n} crops of {TILE} px from {len(names)} photos")
        times[f"build {split}"] = cli("data", "build", "--images", str(work / f"photos-{split}"), *spaces,
                                      "--tile-size", str(TILE), "--max-tiles", "1", "--out", str(data), "--quiet")
    results = {}
    for src, dst in (("fx2", "sana"), ("sana", "fx2")):
        name = f"{src}-{dst}{args.tag}"
        crop = TILE // (8 if src == "fx2" else 32)
        flags = ["--arch", args.arch] if args.arch else []
        times[f"train {src}->{dst}"] = cli(
            "train", "--data", str(work / "data-train"), "--src", src, "--dst", dst, "--out", str(work / "runs"),
            "--name", name, "--steps", str(args.steps), "--batch", str(args.batch), "--crop", str(crop),
            "--val-fraction", "0", "--checkpoint-every", str(args.steps), "--eval-every", str(args.steps),
            *flags, *args.extra.split())
        times[f"eval {src}->{dst}"] = cli(
            "eval", "--model", str(work / "runs" / name), "--data", str(work / "data-test"), "--split", "all",
            "--limit", "0", "--linear-data", str(work / "data-train"), "--trust-remote-code")
        results[(src, dst)] = json.loads((work / "runs" / name / "export" / "eval.json").read_text())
    report(results, times)


def report(results: dict, times: dict) -> None:
    def row(result, method):
        return next((r for r in result["rows"] if r["method"] == method), None)

    print("\n| pair | metric | VAE round trip | linear map | interposer | interposer beats linear on |")
    print("|---|---|---|---|---|---|")
    to_sana, to_fx2 = results[("fx2", "sana")], results[("sana", "fx2")]
    rt, lin, net = (row(to_sana, m) for m in ("round trip", "linear", "interposer"))
    print(f"| fx2 → sana | latent L1 ({to_sana['tiles']} held-out tiles) | {rt['latent_l1']:.3f} | "
          f"{lin['latent_l1']:.3f} | **{net['latent_l1']:.3f}** ({net['latent_l1'] / rt['latent_l1']:.2f}× round trip) "
          f"| {_beats(net, lin, 'l1')} |")
    lin, net, own = row(to_fx2, "linear"), row(to_fx2, "interposer"), to_fx2["target_vae"]
    print(f"| sana → fx2 | decoded PSNR vs photo, dB ({to_fx2['tiles']} held-out tiles; taef2's own round trip "
          f"{own['psnr_tile']:.2f}) | n/a (no sana decoder) | {lin['psnr_tile']:.2f} | **{net['psnr_tile']:.2f}** "
          f"({net['psnr_tile'] - lin['psnr_tile']:+.2f} dB) | {_beats(net, lin, 'psnr')} |")
    print("\nwall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def _beats(net: dict, lin: dict, metric: str) -> str:
    if metric == "l1":
        a, b = net["latent_l1_each"], lin["latent_l1_each"]
        wins = sum(x < y for x, y in zip(a, b))
    else:
        a, b = net["psnr_tile_each"], lin["psnr_tile_each"]
        wins = sum(x > y for x, y in zip(a, b))
    return f"{wins}/{len(a)} tiles"


if __name__ == "__main__":
    main()
