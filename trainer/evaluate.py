"""`interposer eval`: measure an interposer against what it replaces, on a dataset split.

    interposer eval --model runs/xl-v1 --data data/xl-v1 --split val --limit 64
    interposer eval --model xl-to-v1_interposer-v4.0.safetensors --src xl --dst v1 --data data/xl-v1

Rows: the interposer; the VAE round trip (decode with the source VAE, encode with the target VAE); a
per-pixel affine map (1x1 conv) fitted by least squares on the train split; the untouched source latent
where channel counts match. Columns: latent L1 / MSE against the target latent; PSNR and SSIM of the
decoded result against the original tile and against the decoded target latent; colour shift as CIEDE2000
between image means (CIELAB); milliseconds per latent. Metrics come from scikit-image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from interposer import load_interposer
from interposer.spaces import get_space, pair_scale
from interposer.vae import decode_raw, encode_raw, load_vae

METHODS = ("interposer", "round trip", "linear", "identity")


def resample(src: torch.Tensor, scale: float) -> torch.Tensor:
    return src if scale == 1.0 else F.interpolate(src, scale_factor=scale, mode="nearest")


def fit_linear(src: torch.Tensor, dst: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares per-pixel affine map: dst[:, o] ~ sum_i W[o, i] src[:, i] + b[o] (a 1x1 conv).
    src (N, Cs, h, w) is first resampled to dst's grid by `scale`. Returns (W (Cd, Cs), b (Cd,))."""
    x = resample(src.double(), scale)
    xs = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N*h*w, Cs)
    ys = dst.double().permute(0, 2, 3, 1).reshape(-1, dst.shape[1])  # (N*h*w, Cd)
    a = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
    sol = torch.linalg.lstsq(a, ys).solution  # (Cs+1, Cd)
    return sol[:-1].T.float().contiguous(), sol[-1].float()


def apply_linear(w: torch.Tensor, b: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return F.conv2d(resample(src.float(), scale), w[:, :, None, None], b)


def image_metrics(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, SSIM) of two HxWx3 images in [0, 1] (scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = peak_signal_noise_ratio(ref, pred, data_range=1.0)
    win = min(7, min(ref.shape[:2]) // 2 * 2 - 1) if min(ref.shape[:2]) < 7 else 7
    ssim = structural_similarity(ref, pred, data_range=1.0, channel_axis=2, win_size=max(win, 3))
    return float(psnr), float(ssim)


def mean_delta_e(pred: np.ndarray, ref: np.ndarray) -> float:
    """CIEDE2000 between the two images' mean colours (in CIELAB): the colour/hue shift a viewer sees."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    lab = lambda im: rgb2lab(im.reshape(-1, 1, 3).mean(axis=0, keepdims=True))  # noqa: E731
    return float(deltaE_ciede2000(lab(pred), lab(ref))[0, 0])


def _to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float64 in [0, 1]."""
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).double().cpu().numpy()


def _tiles(reader, split: str, limit: int | None):
    """(tile rows, src latents, dst latents) of a split's first `limit` tiles, in dataset order; reads only
    the shards (and latent row groups) that hold them."""
    tiles = reader.take(split, limit or None)
    return tiles.rows.to_pylist(), torch.from_numpy(tiles.src).float(), torch.from_numpy(tiles.dst).float()


def evaluate(model: str, data: str, split: str = "val", limit: int | None = 64, device: str = "cpu",
             val_fraction: float = 0.02, src: str | None = None, dst: str | None = None,
             vaes: dict[str, str] | None = None, fit_tiles: int = 256, batch: int = 8,
             trust_remote_code: bool = False, grid: str | Path | None = None, grid_tiles: int = 4,
             linear_data: str | None = None, vae_cache: dict | None = None) -> dict:
    """The eval table (and, with `grid`, a PNG of a few tiles: original | target VAE | round trip | interposer |
    linear, decoded by the target VAE). Encoder-only VAEs: the round trip needs the source's decoder and every
    pixel metric the target's; what cannot be computed is left out and said once in `notes`."""
    from tqdm import tqdm

    from interposer.pipeline.schema import register_manifest_spaces

    from .data import PairReader

    dev = torch.device(device)
    path = Path(model)
    net = load_interposer(str(path)) if src is None else load_interposer(src, dst, weights=path)
    if getattr(net, "src", None) is None:  # a universal model converts many pairs
        raise ValueError(f"{path} is a universal interposer ({', '.join(net.spaces)}): name the pair to evaluate "
                         "with --src and --dst")
    src, dst = net.src, net.dst
    s, d = get_space(src), get_space(dst)
    if not s.decoder and not d.decoder:
        raise ValueError(f"neither the {src} nor the {dst} VAE has a decoder: no round trip and no pixels to "
                         "compare; evaluate a pair where at least one side decodes")
    net = net.to(dev).eval()
    reader = PairReader(data, src, dst, val_fraction)
    manifest = register_manifest_spaces(reader.manifest)  # a name the model's config defines otherwise: refused
    rows, x, y = _tiles(reader, split, limit)
    # the linear baseline is fitted on training tiles: this dataset's train split, or another dataset's
    _, fx, fy = _tiles(reader if linear_data is None else PairReader(linear_data, src, dst, 0.0), "train", fit_tiles)
    scale = pair_scale(src, dst)
    w, b = fit_linear(fx, fy, scale)
    notes = []
    if not s.decoder:
        notes.append(f"round trip left out: the {src} VAE has no decoder")
    if not d.decoder:
        notes.append(f"no pixel metrics or picture: the {dst} VAE has no decoder (latent metrics only)")

    def vae(code):  # loaded once per space across pairs when the caller keeps a vae_cache
        cache = {} if vae_cache is None else vae_cache
        if code not in cache:
            cache[code] = _load_vae(manifest, code, (vaes or {}).get(code), dev, trust_remote_code)
        return cache[code]

    src_vae = vae(src) if s.decoder else None
    dst_vae = vae(dst)
    methods = {"interposer": lambda z: net(z.to(dev))}
    if s.decoder:
        methods["round trip"] = lambda z: encode_raw(dst_vae, d, decode_raw(src_vae, s, z))[0]
    methods["linear"] = lambda z: apply_linear(w.to(dev), b.to(dev), z.to(dev), scale)
    if s.channels == d.channels:
        methods["identity"] = lambda z: resample(z.to(dev), scale)
    measured = _Measured(methods)
    bar = tqdm(range(0, len(rows), batch), desc="eval", unit="batch", leave=False)
    with torch.inference_mode():
        for i in bar:
            originals = [_original(r, manifest) for r in rows[i : i + batch]] if d.decoder else []
            measured.batch(x[i : i + batch], y[i : i + batch].to(dev), originals, dst_vae if d.decoder else None,
                           d, dev, grid_tiles)
    result = dict(model=str(path), src=src, dst=dst, data=data, split=split, tiles=len(rows),
                  tile_size=manifest.tile_size, device=str(dev), linear_fit_tiles=len(fx),
                  tile_uris=[r["uri"] for r in rows],
                  linear_fit_data="this dataset's train split" if linear_data is None else str(linear_data),
                  vaes={c: manifest.spaces[c].vae for c in (src, dst)}, rows=measured.rows(len(rows)), notes=notes,
                  target_vae={k: _finite_mean(v) for k, v in measured.own.items()} if d.decoder else None)
    if grid is not None and measured.pictures.get("original"):
        write_grid(measured.pictures, grid, f"{src} -> {dst}")
        result["grid"] = Path(grid).name
    return result


def evaluate_universal(model: str, data: str, **kwargs) -> dict:
    """Every pair of a universal model that `data` holds, each evaluated as `evaluate` does one (the same split
    and tiles, each VAE loaded once): {"pairs": [a pair's result, ...], "rows": a row per pair, ...}. A pair
    neither of whose VAEs decodes is left out and said in `notes`."""
    from interposer.pipeline.schema import read_manifest, register_manifest_spaces

    net = load_interposer(str(model))
    manifest = register_manifest_spaces(read_manifest(data))
    pairs = [(a, b) for a, b in net.pairs() if a in manifest.spaces and b in manifest.spaces]
    if not pairs:
        raise ValueError(f"--data {data} holds no pair of {model}'s spaces ({', '.join(net.spaces)}); it has "
                         f"{', '.join(manifest.spaces)}")
    notes = [f"{a} -> {b} left out: neither VAE has a decoder" for a, b in pairs
             if not get_space(a).decoder and not get_space(b).decoder]
    missing = [c for c in net.spaces if c not in manifest.spaces]
    if missing:
        notes.append(f"pairs with {', '.join(missing)} left out: {data} has no such latents")
    cache: dict = {}
    results = [evaluate(model, data, src=a, dst=b, vae_cache=cache, **kwargs) for a, b in pairs
               if get_space(a).decoder or get_space(b).decoder]
    first = results[0] if results else {}
    return dict(model=str(model), data=data, universal=True, spaces=list(net.spaces), split=first.get("split"),
                tiles=first.get("tiles"), tile_size=manifest.tile_size, device=first.get("device"),
                rows=[pair_row(r) for r in results], pairs=results, notes=notes)


def pair_row(result: dict) -> dict:
    """One pair's evaluation as a row of the universal table: the interposer against the round trip and the
    linear map (None where a method did not run)."""
    by = {r["method"]: r for r in result["rows"]}
    get = lambda m, k: by[m][k] if m in by else None  # noqa: E731
    trip = get("round trip", "latent_l1")
    return dict(pair=f"{result['src']}->{result['dst']}", latent_l1=get("interposer", "latent_l1"),
                round_trip_l1=trip, linear_l1=get("linear", "latent_l1"),
                vs_round_trip=get("interposer", "latent_l1") / trip if trip else None,
                psnr_tile=get("interposer", "psnr_tile"), linear_psnr_tile=get("linear", "psnr_tile"),
                delta_e=get("interposer", "delta_e"), ms_per_latent=get("interposer", "ms_per_latent"))


PAIR_COLUMNS = [("pair", "pair", ""), ("latent L1", "latent_l1", ".4f"), ("round trip L1", "round_trip_l1", ".4f"),
                ("linear L1", "linear_l1", ".4f"), ("× round trip", "vs_round_trip", ".2f"),
                ("PSNR tile (dB)", "psnr_tile", ".2f"), ("linear PSNR", "linear_psnr_tile", ".2f"),
                ("ΔE", "delta_e", ".2f"), ("ms / latent", "ms_per_latent", ".2f")]


def format_pairs_table(result: dict) -> str:
    """The universal table as text: a row per pair."""
    widths = [max(len(name), 9) for name, _, _ in PAIR_COLUMNS]
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"universal model ({', '.join(result['spaces'])}): {len(result['rows'])} pairs, {result['tiles']} "
             f"{result['split']} tiles of {result['tile_size']} px each, on {result['device']}",
             *[f"note: {n}" for n in result.get("notes", [])],
             " ".join(f"{name:>{w}}" for (name, _, _), w in zip(PAIR_COLUMNS, widths))]
    for r in result["rows"]:
        lines.append(" ".join(f"{cell(r[k], f):>{w}}" for (_, k, f), w in zip(PAIR_COLUMNS, widths)))
    return "\n".join(lines)


def _load_vae(manifest, code: str, given: str | None, dev: torch.device, trust_remote_code: bool):
    """A space's VAE: the dataset's, or `given` (--vae CODE=SOURCE); checked to make the space's latents."""
    entry, space = manifest.spaces[code], get_space(code)
    source = given or entry.vae
    loaded = load_vae(space, source, None if given else entry.subfolder, torch.float32, dev, trust_remote_code,
                      None if given else entry.code)
    side = 8 * space.factor  # a VAE of the wrong shape: one line now, not a convolution error later
    got = encode_raw(loaded, space, torch.zeros(1, 3, side, side, device=dev))[0].shape[1:]
    if tuple(got) != (space.channels, 8, 8):
        raise ValueError(f"--vae {code}={source}: it makes latents of shape {tuple(got)} from a {side}px image; "
                         f"{space.describe()} needs {(space.channels, 8, 8)}")
    return loaded


def _finite_mean(values: list[float]) -> float | None:
    return float(np.mean([v for v in values if np.isfinite(v)])) if any(np.isfinite(values)) else None


class _Measured:
    """Every method's sums over the tiles seen so far, the target VAE's own figures, and the grid's pictures."""

    def __init__(self, methods: dict):
        self.methods = methods
        self.acc = {m: dict(l1=0.0, mse=0.0, psnr_tile=[], ssim_tile=[], psnr_target=[], ssim_target=[], de=[],
                            sec=0.0, l1_each=[]) for m in methods}
        self.own = dict(psnr_tile=[], ssim_tile=[], delta_e=[])  # the target latent decoded: the VAE's ceiling
        self.n_el = 0
        self.pictures: dict[str, list[np.ndarray]] = {}  # column -> the first grid_tiles images, for the PNG

    def batch(self, zs, zt, originals, dst_vae, d, dev, grid_tiles: int) -> None:
        """One batch of source latents `zs`, target latents `zt` and their tiles; `dst_vae` None: latents only."""
        target_images = _to_images(decode_raw(dst_vae, d, zt)) if dst_vae is not None else []
        _keep(self.pictures, "original", originals, grid_tiles)
        _keep(self.pictures, f"{d.code} VAE", target_images, grid_tiles)
        self.n_el += zt.numel()
        for img, orig in zip(target_images, originals):  # the target VAE's own round trip of the tile
            p1, s1 = image_metrics(img, orig)
            self.own["psnr_tile"].append(p1), self.own["ssim_tile"].append(s1)
            self.own["delta_e"].append(mean_delta_e(img, orig))
        for name, fn in self.methods.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pred = fn(zs).float()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            a = self.acc[name]
            a["sec"] += time.perf_counter() - start
            a["l1"] += (pred - zt).abs().sum().item()
            a["mse"] += ((pred - zt) ** 2).sum().item()
            a["l1_each"] += (pred - zt).abs().flatten(1).mean(1).tolist()
            if dst_vae is None:
                continue
            images = _to_images(decode_raw(dst_vae, d, pred))
            if name != "identity":
                _keep(self.pictures, name, images, grid_tiles)
            for img, orig, tgt in zip(images, originals, target_images):
                p1, s1 = image_metrics(img, orig)
                p2, s2 = image_metrics(img, tgt)
                a["psnr_tile"].append(p1), a["ssim_tile"].append(s1)
                a["psnr_target"].append(p2), a["ssim_target"].append(s2)
                a["de"].append(mean_delta_e(img, orig))

    def rows(self, tiles: int) -> list[dict]:
        """The table: a row per method."""
        return [dict(method=name, latent_l1=a["l1"] / self.n_el, latent_mse=a["mse"] / self.n_el,
                     psnr_tile=_finite_mean(a["psnr_tile"]), ssim_tile=_finite_mean(a["ssim_tile"]),
                     psnr_target=_finite_mean(a["psnr_target"]), ssim_target=_finite_mean(a["ssim_target"]),
                     delta_e=_finite_mean(a["de"]), ms_per_latent=1000 * a["sec"] / tiles,
                     psnr_tile_each=[round(v, 3) for v in a["psnr_tile"]],
                     latent_l1_each=[round(v, 5) for v in a["l1_each"]])
                for name, a in self.acc.items()]


def _original(row: dict, manifest) -> np.ndarray:
    """The tile's pixels, re-cut from its source image: (T, T, 3) float64 in [0, 1]."""
    from interposer.pipeline.rows import cut_one  # re-derives the original tile from its source image

    cut = cut_one(row["uri"], row["image_id"], manifest.tile_size, manifest.max_tiles, manifest.min_size,
                  manifest.max_pixels)
    indices = json.loads(cut["indices"])
    if cut["status"] != "ok" or row["tile_index"] not in indices:  # moved, deleted or changed since the build
        reason = "missing, or not the bytes the build read" if cut["status"] == "unreadable" else cut["status"]
        raise FileNotFoundError(f"tile {row['tile_index']} of {row['uri']}: the dataset's source image cannot be re-cut "
                                f"({reason}); decoded figures need the sources where the dataset was built from them "
                                f"(moved? evaluate where they are, or rebuild the dataset)")
    tiles = np.frombuffer(cut["pixels"], np.uint8).reshape(len(indices), manifest.tile_size, manifest.tile_size, 3)
    return tiles[indices.index(row["tile_index"])].astype(np.float64) / 255.0


def _keep(pictures: dict, column: str, images, n: int) -> None:
    have = pictures.setdefault(column, [])
    have.extend(list(images)[: max(0, n - len(have))])


def write_grid(pictures: dict[str, list[np.ndarray]], path: str | Path, title: str = "") -> Path:
    """A PNG: one row per tile, one column per method (labelled on top), images in [0, 1] side by side."""
    from PIL import Image, ImageDraw

    columns = [c for c in pictures if pictures[c]]
    n = min(len(pictures[c]) for c in columns)
    side = pictures[columns[0]][0].shape[0]
    pad, label = 4, 16
    width = len(columns) * (side + pad) + pad
    canvas = Image.new("RGB", (width, label + n * (side + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, column in enumerate(columns):
        x0 = pad + j * (side + pad)
        draw.text((x0, 2), column if j else f"{column} ({title})" if title and side >= 200 else column, fill=(0, 0, 0))
        for i in range(n):
            img = (np.clip(pictures[column][i], 0, 1) * 255 + 0.5).astype(np.uint8)
            canvas.paste(Image.fromarray(img), (x0, label + pad + i * (side + pad)))
    from interposer.files import atomic_write

    atomic_write(Path(path), lambda p: canvas.save(p, format="PNG"))
    return Path(path)


def format_table(result: dict) -> str:
    head = f"{'method':<12} {'lat L1':>8} {'lat MSE':>8} {'PSNR tile':>9} {'SSIM tile':>9} {'PSNR tgt':>9} " \
           f"{'SSIM tgt':>8} {'ΔE':>6} {'ms/lat':>8}"
    lines = [f"{result['src']} -> {result['dst']}: {result['tiles']} {result['split']} tiles of "
             f"{result['tile_size']} px on {result['device']}", head]
    lines[1:1] = [f"note: {n}" for n in result.get("notes", [])]
    if result.get("target_vae"):  # the ceiling: what the target VAE itself makes of the tile
        t = result["target_vae"]
        lines.insert(1, f"the {result['dst']} VAE's own round trip of these tiles: PSNR {t['psnr_tile']:.2f} dB, "
                        f"SSIM {t['ssim_tile']:.4f}, ΔE {t['delta_e']:.2f}")
    fmt = lambda v, f: format(v, f) if v is not None else format("-", f">{f.split('.')[0]}")  # noqa: E731
    for r in result["rows"]:
        lines.append(f"{r['method']:<12} {r['latent_l1']:>8.4f} {r['latent_mse']:>8.4f} {fmt(r['psnr_tile'], '9.2f')} "
                     f"{fmt(r['ssim_tile'], '9.4f')} {fmt(r['psnr_target'], '9.2f')} {fmt(r['ssim_target'], '8.4f')} "
                     f"{fmt(r['delta_e'], '6.2f')} {r['ms_per_latent']:>8.2f}")
    return "\n".join(lines)
