"""Convert one latent with the interposer vs the VAE round trip it replaces, side by side.

    python bench/convert.py                  # 1024 px: a 1x4x128x128 latent (several minutes on 2 CPU cores)
    python bench/convert.py --size 512       # 512 px: 1x4x64x64
    python bench/convert.py --device cuda --dtype float16

The round trip decodes with one SD-class VAE (diffusers AutoencoderKL, the real SD architecture, random
weights) and encodes with another, as moving a latent between spaces costs without an interposer. It is
timed in both memory layouts and the faster one is reported, so the ratio is not flattered by layout.
The interposer is timed through convert() (what users call) and as the plain reference network.
The two sides are timed in alternating rounds and each figure is its best round (noise only slows a run
down); every round's own ratio is printed too. Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from interposer.pipeline.standins import SD_VAE  # noqa: E402
from common import mean_time, sync  # noqa: E402
from interposer import InterposerModel, convert, save_released  # noqa: E402
from interposer.spaces import default_args  # noqa: E402



def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent side = size/8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds, each timing the round trip once and the interposer (default 2)")
    parser.add_argument("--skip-layout-check", action="store_true",
                        help="time the round trip in the plain layout only (halves the run time)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    side = args.size // 8
    latent = torch.randn(1, 4, side, side, device=device, dtype=dtype)  # (1, 4, size/8, size/8)

    # --- the interposer: random weights in the released layout, loaded the way users load them
    net = InterposerModel(**default_args("xl", "v1"))
    net.init_weights(torch.Generator().manual_seed(0))
    weights = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-xl-to-v1_interposer-v4.0.safetensors"
    save_released(net.eval(), weights)
    plain = net.to(device, dtype).eval()

    # --- what it replaces: decode with one SD-class VAE, encode with another
    from diffusers import AutoencoderKL

    dec_vae, enc_vae = (AutoencoderKL(**SD_VAE).to(device).eval() for _ in range(2))
    if dtype != torch.float32:
        dec_vae, enc_vae = dec_vae.to(dtype), enc_vae.to(dtype)

    def round_trip(x):
        image = dec_vae.decode(x).sample  # (1, 3, size, size)
        return enc_vae.encode(image).latent_dist.mean  # (1, 4, size/8, size/8)

    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if args.skip_layout_check:
        formats.pop("channels_last")
    inputs = {name: latent.contiguous(memory_format=fmt) for name, fmt in formats.items()}
    calls = max(3, round(20 * (64 / side) ** 2))  # interposer calls per round: a second or two of work

    def run_convert():
        return convert(latent, "xl", "v1", weights=weights)

    def run_plain():
        return plain(latent)

    # Rounds interleave the two sides, so a slow minute of this shared machine hits both; each round times
    # the round trip once (in both layouts in the first round), then the interposer as the mean of `calls`
    # back-to-back calls.
    trips = {name: [] for name in formats}
    t_convert, t_plain, ratios = [], [], []
    with torch.inference_mode():
        run_convert(), run_plain()  # warm-up: loads weights into convert()'s cache, builds oneDNN kernels
        for r in range(args.repeats):
            for name, fmt in formats.items():
                dec_vae.to(memory_format=fmt)
                enc_vae.to(memory_format=fmt)
                x = inputs[name]
                start = time.perf_counter()
                round_trip(x)
                sync(device)
                trips[name].append(time.perf_counter() - start)
            t_convert.append(mean_time(run_convert, device, calls))
            t_plain.append(mean_time(run_plain, device, calls))
            trip = min(trips[name][-1] for name in formats)
            if r == 0:  # later rounds time the round trip in its faster layout only
                formats = {name: fmt for name, fmt in formats.items() if trips[name][-1] == trip}
            ratios.append(trip / t_convert[-1])
            print(f"round {r + 1}/{args.repeats}: round trip {trip * 1e3:.0f} ms, "
                  f"convert() {t_convert[-1] * 1e3:.1f} ms -> {ratios[-1]:.1f}x", flush=True)
    layouts = {name: min(v) for name, v in trips.items()}
    best = min(layouts, key=layouts.get)
    t_trip, t_convert, t_plain = layouts[best], min(t_convert), min(t_plain)

    print(f"machine      {machine(device)}")
    print(f"latent       1x4x{side}x{side} ({args.size} px), {args.dtype}")
    print(f"round trip   {t_trip * 1e3:10.1f} ms   decode + encode, SD-class AutoencoderKL ({best}; "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in layouts.items()) + ")")
    print(f"interposer   {t_plain * 1e3:10.1f} ms   plain reference network   -> {t_trip / t_plain:7.1f}x faster")
    print(f"convert()    {t_convert * 1e3:10.1f} ms   what users call           -> {t_trip / t_convert:7.1f}x faster")
    print(f"ratio        {statistics.median(ratios):10.1f}x  convert() vs round trip (goal >= 300; median of the "
          f"rounds' own ratios: {', '.join(f'{r:.1f}' for r in ratios)})")


if __name__ == "__main__":
    main()
