"""The universal interposer against pairwise networks at the same compute (issue 23's goals), in plain torch
loops over the product's networks and optimiser (no Ray).

    python bench/universal.py --vaes ../shared/vaes                       # ~15 min on 2 CPU cores
    python bench/universal.py --vaes ../shared/vaes --steps 400 --work /tmp/u   # a short trial
    python bench/universal.py --vaes ../shared/vaes --pair-loss linear    # each pair's L1 over its linear map's
    python bench/universal.py --vaes ../shared/vaes --pair-loss raw,linear   # both, beside one set of pairwise nets

Data: the quality bench's two datasets (--quality: bench/quality.py's --work, built there if missing: 1890
train tiles and 27 held-out tiles of 256 px, fx2 = taef2 and sana = taesana, the two real VAEs of --vaes)
copied into --work, plus three spaces added with `interposer data add-space` from stand-in VAEs of the
registry's classes (xl: AutoencoderKL, ca: Stable Cascade's Paella VQ, wan: AutoencoderKLWan): 5 spaces,
/4 to /32, 20 ordered pairs. Every run draws the same tiles and crops (--crop working-grid pixels of 8 px, at
a position on whole pixels of every space), trains L1 on the latents with AdamW and the trainer's cosine
schedule, and is seeded:

    universal   one network over the 5 spaces, --steps steps of --batch samples, each sample's pair drawn
                uniformly
    pairwise    each pair's own default network (the trainer's `auto`: v4 64x12 where both spaces share a
                factor, shuffle 64x12 where not), --steps/20 steps of --batch: the same samples in all
    base4       the universal network over the 4 spaces other than wan, --steps x 12/20 steps
    add-space   wan added to base4 with the rest frozen, --add-steps steps (default --steps/5) on wan's 8 pairs

Printed: held-out latent L1 per pair (universal, pairwise, add-space, the linear map), the ratios the goals
name, parameters and file sizes, each run's wall time, and convert() latency at 1024 px on the CPU of a
universal pair against a v4 64x12 network of the same channels (median of alternating rounds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACES = ("fx2", "sana", "xl", "ca", "wan")
NEW = "wan"
STANDINS = ("xl", "ca", "wan")
GRID = 8


def cli(*argv: str) -> None:
    from interposer.cli import main

    print(f"$ interposer {' '.join(argv)}", flush=True)
    rc = main(list(argv))
    if rc:
        sys.exit(f"interposer {argv[0]} failed with status {rc}")


def build(work: Path, quality: Path, vaes: Path) -> None:
    """--work/data-{train,test}: the quality bench's datasets plus the stand-in spaces (reused when there)."""
    from interposer.pipeline.schema import read_manifest
    from interposer.pipeline.standins import make_standin_vae

    if not all((quality / f"data-{s}" / "manifest.json").is_file() for s in ("train", "test")):
        subprocess.run([sys.executable, str(Path(__file__).with_name("quality.py")), "--vaes", str(vaes), "--work",
                        str(quality), "--build-only"], check=True)
    for split in ("train", "test"):
        data = work / f"data-{split}"
        if not (data / "manifest.json").is_file():
            shutil.copytree(quality / f"data-{split}", data)
        for i, code in enumerate(STANDINS):
            if code not in read_manifest(str(data)).spaces:
                vae = make_standin_vae(code, work / "vaes" / code, seed=10 + i, width=16)
                cli("data", "add-space", "--data", str(data), "--space", f"{code}={vae}", "--quiet")


def load(data: str) -> dict[str, torch.Tensor]:
    """Every space's raw latents of a dataset's tiles, float32, in dataset order (~290 kB a 256 px tile)."""
    from interposer.trainer.data import TileReader

    reader = TileReader(data, SPACES, 0.0)
    every = reader.manifest.counts["tiles"]
    return {c: torch.from_numpy(x).float() for c, x in zip(reader.spaces, reader.take_all("train", every))}


class Draws:
    """The same batches for every run: per step `batch` tile indices and one crop origin in grid pixels."""

    def __init__(self, n: int, side: int, crop: int, batch: int, seed: int):
        from interposer.spaces import get_space

        self.unit = max(1, max(get_space(c).factor for c in SPACES) // GRID)  # whole pixels of every space
        self.n, self.side, self.crop, self.batch, self.seed = n, side, crop, batch, seed

    def step(self, step: int, stream: int = 0) -> tuple[torch.Tensor, int, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7 + stream)
        idx = torch.randint(0, self.n, (self.batch,), generator=g)
        top, left = (torch.randint(0, (self.side - self.crop) // self.unit + 1, (2,), generator=g) * self.unit).tolist()
        return idx, top, left


def cut(latents: dict, code: str, idx, top: int, left: int, crop: int) -> torch.Tensor:
    from interposer.spaces import get_space

    f = get_space(code).factor
    r = lambda v: v * GRID // f  # noqa: E731
    return latents[code][idx, :, r(top): r(top + crop), r(left): r(left + crop)]


def train_universal(net, cfg, latents, draws: Draws, pairs, steps: int, stream: int,
                    weights: dict | None = None) -> float:
    """`steps` steps of `net` on `pairs` (uniform draws per sample), each pair's L1 times its `weights` (default
    1); its wall time."""
    from interposer.trainer.step import build_optim

    opt, sched = build_optim(cfg, net)
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        idx, top, left = draws.step(step, stream)
        g = torch.Generator().manual_seed(draws.seed + 31 * step + stream)
        which = torch.randint(0, len(pairs), (len(idx),), generator=g)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for p in which.unique().tolist():
            a, b = pairs[p]
            rows = idx[which == p]
            x, y = cut(latents, a, rows, top, left, draws.crop), cut(latents, b, rows, top, left, draws.crop)
            total = total + F.l1_loss(net(x, a, b), y) * len(rows) * (weights or {}).get((a, b), 1.0)
        (total / len(idx)).backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0:
            print(f"  step {step}/{steps}: loss {float(total.detach()) / len(idx):.4f}", flush=True)
    return time.perf_counter() - start


def train_pair(cfg, net, latents, draws: Draws, a: str, b: str, steps: int) -> float:
    from interposer.trainer.step import build_optim

    opt, sched = build_optim(cfg, net)
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        idx, top, left = draws.step(step, 100)
        x, y = cut(latents, a, idx, top, left, draws.crop), cut(latents, b, idx, top, left, draws.crop)
        opt.zero_grad(set_to_none=True)
        F.l1_loss(net(x), y).backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def held_out_l1(fn, test: dict, a: str, b: str, limit: int | None = None) -> float:
    """Mean |fn(x) - y| over the first `limit` tiles (default all) of `test`, a -> b."""
    n = len(test[a]) if limit is None else min(limit, len(test[a]))
    return sum((fn(test[a][i: min(i + 8, n)]) - test[b][i: min(i + 8, n)]).abs().sum().item()
               for i in range(0, n, 8)) / test[b][:n].numel()


def file_bytes(net, *pair) -> int:
    from interposer import save_interposer

    with tempfile.TemporaryDirectory() as tmp:
        save_interposer(net, tmp, *pair)
        return (Path(tmp) / "model.safetensors").stat().st_size


def latency(folders: dict[str, tuple], rounds: int = 5) -> dict[str, float]:
    """Median seconds of convert() at 1024 px on the CPU per (name: (src, dst, folder, channels, factor))."""
    from interposer import convert

    xs = {k: torch.randn(1, c, 1024 // f, 1024 // f) for k, (_, _, _, c, f) in folders.items()}
    times = {k: [] for k in folders}
    for k in folders:  # warm-up
        convert(xs[k], folders[k][0], folders[k][1], weights=folders[k][2])
    for _ in range(rounds):
        for k, (s, d, f, _, _) in folders.items():
            start = time.perf_counter()
            convert(xs[k], s, d, weights=f)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vaes", required=True, help="folder with taef2/ and taesana/ (../shared/vaes here)")
    parser.add_argument("--quality", default="bench-quality", help="the quality bench's --work (its datasets)")
    parser.add_argument("--work", default="bench-universal", help="folder for the 5-space datasets")
    parser.add_argument("--steps", type=int, default=2000, help="universal steps (pairwise: steps/20 each)")
    parser.add_argument("--add-steps", type=int, default=None, help="add-space steps (default steps/5)")
    parser.add_argument("--batch", type=int, default=16, help="samples per step (default 16)")
    parser.add_argument("--crop", type=int, default=8, help="crop in working-grid pixels of 8 px (default 8: 64 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pair-loss", default="raw",
                        help="universal runs' loss per pair, or several comma-separated, each its own universal, base4 "
                             "and add-space runs beside the same pairwise networks: raw, the L1 as it is (default); "
                             "linear, each pair's L1 divided by its linear map's L1 on the training tiles (times their "
                             "mean), so that every pair weighs by its error relative to how hard it is, not by its "
                             "space's scale")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    args = parser.parse_args()
    modes = args.pair_loss.split(",")
    if not modes or any(m not in ("raw", "linear") for m in modes) or len(set(modes)) < len(modes):
        parser.error(f"--pair-loss: raw, linear or raw,linear, not {args.pair_loss!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    vaes, work, quality = Path(args.vaes).resolve(), Path(args.work).resolve(), Path(args.quality).resolve()
    from interposer.pipeline.schema import read_manifest, register_manifest_spaces
    from interposer.spaces import get_space, pair_scale
    from interposer.trainer.config import TrainConfig
    from interposer.trainer.evaluate import apply_linear, fit_linear
    from interposer.trainer.step import build_models, latent_stats
    from interposer.trainer.universal import STATS_TILES, channel_stats, universal_network

    start = time.perf_counter()
    build(work, quality, vaes)
    built = time.perf_counter() - start
    register_manifest_spaces(read_manifest(str(work / "data-train")))
    train, test = load(str(work / "data-train")), load(str(work / "data-test"))
    n, side = len(train["fx2"]), train["fx2"].shape[-1] * get_space("fx2").factor // GRID
    print(f"{n} train tiles, {len(test['fx2'])} held-out tiles, spaces {', '.join(SPACES)}; data ready in "
          f"{built:.0f} s", flush=True)
    draws = Draws(n, side, args.crop, args.batch, args.seed)
    pairs = [(a, b) for a in SPACES for b in SPACES if a != b]
    stats = {c: channel_stats(train[c][:STATS_TILES]) for c in SPACES}  # as a run measures them
    steps, add_steps = args.steps, args.add_steps or args.steps // 5
    ucfg = lambda k, **kw: TrainConfig.of(arch="universal", steps=k, fconst=0, seed=args.seed, crop=args.crop,  # noqa: E731
                                          batch=args.batch, **kw)

    linear = {}  # each pair's linear map, fitted on the first 256 training tiles: the table's baseline
    for a, b in pairs:
        w, bias = fit_linear(train[a][:256], train[b][:256], pair_scale(a, b))
        linear[(a, b)] = lambda x, w=w, bias=bias, scale=pair_scale(a, b): apply_linear(w, bias, x, scale)
    per = max(1, steps // len(pairs))
    print(f"pairwise: {per} steps for each of {len(pairs)} pairs", flush=True)
    nets, walls = {}, {"pairwise": 0.0}
    for a, b in pairs:
        cfg = TrainConfig.of(src=a, dst=b, steps=per, fconst=0, seed=args.seed, crop=args.crop * GRID // get_space(a).factor,
                             batch=args.batch)
        net = build_models(cfg, latent_stats(train[a][:256], train[b][:256]) if cfg.model.arch != "v4" else None)[0]
        walls["pairwise"] += train_pair(cfg, net, train, draws, a, b, per)
        nets[(a, b)] = net.eval()
    known = [c for c in SPACES if c != NEW]
    base_pairs = [(a, b) for a in known for b in known if a != b]
    base_steps = steps * len(base_pairs) // len(pairs)
    new_pairs = [(a, b) for a in SPACES for b in SPACES if a != b and NEW in (a, b)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    held = {(a, b): (held_out_l1(linear[(a, b)], test, a, b), held_out_l1(nets[(a, b)], test, a, b)) for a, b in pairs}

    results, summary = {}, []  # per pair-loss mode: {pair: (universal L1, add-space L1 or None)}
    for mode in modes:
        weights = None
        if mode == "linear":  # measured on the tiles the maps are fitted on
            ref = {(a, b): held_out_l1(linear[(a, b)], train, a, b, 256) for a, b in pairs}
            mean_ref = sum(ref.values()) / len(ref)
            weights = {p: mean_ref / v for p, v in ref.items()}
            print("pair loss weights: " + ", ".join(f"{a}->{b} {v:.2f}" for (a, b), v in weights.items()), flush=True)
        print(f"[{mode}] universal: {steps} steps over {len(pairs)} pairs", flush=True)
        uni = universal_network(ucfg(steps), list(SPACES), stats)
        walls[f"universal {mode}"] = train_universal(uni, ucfg(steps), train, draws, pairs, steps, 0, weights)
        print(f"[{mode}] base4: {base_steps} steps over {len(base_pairs)} pairs (without {NEW})", flush=True)
        base = universal_network(ucfg(base_steps), known, {c: stats[c] for c in known})
        walls[f"base4 {mode}"] = train_universal(base, ucfg(base_steps), train, draws, base_pairs, base_steps, 1, weights)
        acfg = ucfg(add_steps, add_space=NEW, base="base4")
        added = universal_network(acfg, [NEW, *known], {NEW: stats[NEW]},
                                  dict(args=base.args(), state={k: v.clone() for k, v in base.state_dict().items()}))
        print(f"[{mode}] add-space {NEW}: {add_steps} steps over its {len(new_pairs)} pairs, the rest frozen", flush=True)
        walls[f"add-space {mode}"] = train_universal(added, acfg, train, draws, new_pairs, add_steps, 2, weights)
        uni.eval(), added.eval(), base.eval()
        results[mode] = {(a, b): (held_out_l1(lambda x: uni(x, a, b), test, a, b),
                                  held_out_l1(lambda x: added(x, a, b), test, a, b) if (a, b) in new_pairs else None)
                         for a, b in pairs}
        ratios = [results[mode][p][0] / held[p][1] for p in pairs]
        add_ratios = [results[mode][p][1] / held[p][1] for p in new_pairs]
        summary.append(f"[{mode}] universal / pairwise: mean {mean(ratios):.3f}, worst {max(ratios):.3f} "
                       f"({sum(r <= 1.05 for r in ratios)}/{len(ratios)} pairs within 5%); add-space / pairwise on "
                       f"{NEW}'s pairs: mean {mean(add_ratios):.3f}, worst {max(add_ratios):.3f} "
                       f"({sum(r <= 1.10 for r in add_ratios)}/{len(add_ratios)} within 10%); add-space / universal "
                       f"time {walls[f'add-space {mode}'] / walls[f'universal {mode}']:.3f}")

    head = "".join(f" universal {m} | / pairwise | add-space {m} | / pairwise |" for m in modes)
    print(f"\n| pair | linear map | pairwise |{head}")
    print("|---|---|---|" + "---|---|---|---|" * len(modes))
    for a, b in pairs:
        lin, pw = held[(a, b)]
        cells = ""
        for m in modes:
            un, ad = results[m][(a, b)]
            cells += f" {un:.4f} | {un / pw:.3f} |" + (f" {ad:.4f} | {ad / pw:.3f} |" if ad is not None else "  |  |")
        print(f"| {a} → {b} | {lin:.4f} | {pw:.4f} |{cells}")
    print("\n" + "\n".join(summary))

    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    trained = sum(p.numel() for p in added.space_parameters(NEW))
    print(f"parameters: universal {params(uni):,} in 1 file of {file_bytes(uni):,} B; pairwise "
          f"{sum(params(m) for m in nets.values()):,} in {len(nets)} files of "
          f"{sum(file_bytes(m, a, b) for (a, b), m in nets.items()):,} B")
    print(f"add-space trains {trained:,} of {params(added):,} parameters ({trained / params(added):.3f})")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))

    from interposer import save_interposer
    from interposer.model import InterposerModel

    with tempfile.TemporaryDirectory() as tmp:
        save_interposer(uni, f"{tmp}/uni")
        v4 = InterposerModel(4, 4, 64, 12, 1.0)
        save_interposer(v4, f"{tmp}/v4", "xl", "v1")
        v4b = InterposerModel(32, 4, 64, 12, 1.0)
        save_interposer(v4b, f"{tmp}/v4b", "fx2", "xl")
        t = latency({"universal xl -> ca": ("xl", "ca", f"{tmp}/uni", 4, 8),
                     "universal fx2 -> xl": ("fx2", "xl", f"{tmp}/uni", 32, 8),
                     "v4 64x12 xl -> v1": ("xl", "v1", f"{tmp}/v4", 4, 8),
                     "v4 64x12 fx2 -> xl": ("fx2", "xl", f"{tmp}/v4b", 32, 8)})
    print("convert() at 1024 px, CPU, median of 5: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in t.items())
          + f"; universal fx2 -> xl / v4 fx2 -> xl {t['universal fx2 -> xl'] / t['v4 64x12 fx2 -> xl']:.2f}, "
          f"universal xl -> ca / v4 xl -> v1 {t['universal xl -> ca'] / t['v4 64x12 xl -> v1']:.2f}")
    print(f"bench wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
