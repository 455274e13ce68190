"""Network variants for the real pair, in plain torch loops (no Ray): fast side-by-side comparisons on the
datasets `bench/quality.py` builds. What the README's variant table reports; the product's numbers come
from bench/quality.py itself.

    python bench/quality_loops.py fx2 sana shuffle 2e-3 600                 # default network, 600 steps
    python bench/quality_loops.py fx2 sana v4 5e-4 600
    python bench/quality_loops.py sana fx2 shuffle 2e-3 600 bl=2 w=64 b=12  # blocks_low, width, blocks
    python bench/quality_loops.py fx2 sana shuffle 2e-3 600 ema=0.99 norm=0
    python bench/quality_loops.py sana fx2 shuffle 2e-3 600 lf=1 pool=4        # + L1 of 4x4-pooled latents
    python bench/quality_loops.py sana fx2 shuffle 2e-3 600 dec=0.1 crop=8 every=4   # + decoded L1 (taef2)
    for s in 0 1 2; do python bench/quality_loops.py sana fx2 shuffle 2e-3 600 seed=$s; done  # the spread

Losses, added to the L1 on latents (loss=mse replaces it by MSE): dc=W, L1 of per-channel means (the
trainer's dc_loss_weight); lf=W pool=P, L1 of the latents average-pooled P x P (low frequencies: colour and
shading); dec=W crop=C every=E, L1 in pixels through taef2's decoder on a C x C latent crop every E steps
(the trainer's decoded loss; fx2 targets only); cw=P weighs the latent loss per channel by taef2's decoder
sensitivity to that channel, to the power P (fx2 targets only); aug=1 flips both sides of half the batch;
seed=N seeds the network's init (N) and the batch draws (N + 1), default 0: run a variant at several seeds
before calling it better (the spread between seeds is the size of the differences measured).
Regularisation and the like: wd=W weight decay (default 0.01); noise=S Gaussian noise on the input, S times
each channel's spread; ens=K K networks of different inits trained side by side on the same batches, each on its
own loss, predicting their mean (the step cost is all K's). skip=a,b leaves out the training tiles of photos a and
b (by file name: skip=brick,camera,grass,gravel,moon,coins trains on the colour photos only); norot=1 leaves out
the RGB-rotated copies of the colour photos (bench/quality.py's variants 1 and 2). save=PATH writes the
trained network's state dict; more=DATA appends the tiles of another dataset of the two spaces to the training
set (skip= applies to the first only); split=1 (into fx2) says where the error is: the decoded figures of the
true latents' coarse part (pooled to the source's grid) with the network's detail, and the network's coarse part
with the true detail, and the pooled L1 on train and test tiles; each=1 prints the colour figure per held-out photo. Steps 0: only the linear map.

Environment: DATA (the quality bench's --work folder, default ./bench-quality), VAES (default ../shared/vaes),
THREADS (torch threads, default 2). Loop: AdamW (betas 0.5, 0.95, weight decay 0.01) at the given learning
rate with a cosine decay over the run, L1 on batches of 16 whole tiles drawn with replacement. Prints the
test latent L1 (and, into fx2, the decoded PSNR against the photo and the CIEDE2000 of mean colours) beside
the linear map's, and ms per step.
"""

import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interposer.model import InterposerModel  # noqa: E402
from interposer.pipeline.schema import read_manifest, register_manifest_spaces  # noqa: E402
from interposer.shuffle_model import ShuffleInterposer  # noqa: E402
from interposer.trainer.data import PairReader  # noqa: E402
from interposer.trainer.evaluate import _original, apply_linear, fit_linear, mean_delta_e  # noqa: E402


@torch.no_grad()
def channel_weights(vae, space, z: torch.Tensor, std: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """Per-channel decoder sensitivity E||D(z + e v_c) - D(z)||^2 / e^2 (v_c: noise of the channel's spread in
    channel c only), normalised to mean 1: how much the decoded image moves with each latent channel."""
    from interposer.vae import decode_raw

    base, g, out = decode_raw(vae, space, z), torch.Generator().manual_seed(2), []
    for c in range(z.shape[1]):
        v = torch.zeros_like(z)
        v[:, c] = torch.randn(z[:, c].shape, generator=g) * eps * std[c]
        out.append(((decode_raw(vae, space, z + v) - base) ** 2).sum() / (eps * std[c]) ** 2)
    w = torch.stack(out)
    return w / w.mean()


def photo_names(rows) -> list[str]:
    """Each tile's photo: bench/quality.py names a crop PHOTO-VARIANT-INDEX.png."""
    return [Path(r["uri"]).name.split("-")[0] for r in rows.to_pylist()]


class Mean(torch.nn.Module):
    """K networks trained side by side on the same batches, each on its own loss (`ens=K`); predicts their mean."""

    def __init__(self, nets: list[torch.nn.Module]):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([n(x) for n in self.nets]).mean(0)


def main() -> None:
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    src, dst, arch, lr, steps = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    extra = dict(a.split("=") for a in sys.argv[6:])
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    data = os.environ.get("DATA", "bench-quality")
    register_manifest_spaces(read_manifest(f"{data}/data-train"))
    tr = PairReader(f"{data}/data-train", src, dst, 0.0).take("train")
    te = PairReader(f"{data}/data-test", src, dst, 0.0).take("train")
    xs, ys = torch.from_numpy(tr.src).float(), torch.from_numpy(tr.dst).float()  # (N, 32, h, w)
    if "skip" in extra:  # leave out the training tiles of these photos (names, comma-separated)
        names = photo_names(tr.rows)
        keep = torch.tensor([n not in extra["skip"].split(",") for n in names])
        xs, ys = xs[keep], ys[keep]
        print(f"{len(xs)} of {len(keep)} training tiles", flush=True)
    if extra.get("norot") == "1":  # leave out the RGB-rotated copies (variants 1 and 2 of a colour photo)
        keep = torch.tensor([Path(r["uri"]).name.split("-")[1] == "0" for r in tr.rows.to_pylist()])
        xs, ys = xs[keep], ys[keep]
        print(f"{len(xs)} of {len(keep)} training tiles without RGB rotations", flush=True)
    if "more" in extra:  # another training dataset of the same two spaces (more photos), appended
        more = PairReader(extra["more"], src, dst, 0.0).take("train")
        xs = torch.cat([xs, torch.from_numpy(more.src).float()])
        ys = torch.cat([ys, torch.from_numpy(more.dst).float()])
        print(f"{len(xs)} training tiles with {extra['more']}", flush=True)
    xt, yt = torch.from_numpy(te.src).float(), torch.from_numpy(te.dst).float()
    scale = yt.shape[-1] / xt.shape[-1]
    seed = int(extra.get("seed", 0))  # the network's init and the batches' draws
    torch.manual_seed(seed)
    width, blocks = int(extra.get("w", 64)), int(extra.get("b", 12))
    if arch == "v4":
        net = InterposerModel(xs.shape[1], ys.shape[1], width, blocks, scale)
    else:
        stats = {}
        if extra.get("norm", "1") == "1":
            stats = dict(in_mean=xs.mean((0, 2, 3)).tolist(), in_std=xs.std((0, 2, 3)).tolist(),
                         out_mean=ys.mean((0, 2, 3)).tolist(), out_std=ys.std((0, 2, 3)).tolist())
        low = int(extra["bl"]) if "bl" in extra else None
        net = ShuffleInterposer(xs.shape[1], ys.shape[1], width, blocks, scale, blocks_low=low, **stats)
    net.init_weights(torch.Generator().manual_seed(seed))
    if int(extra.get("ens", 1)) > 1:  # K networks of different inits, each trained on its own loss
        nets = [net] + [copy.deepcopy(net) for _ in range(int(extra["ens"]) - 1)]
        for k, member in enumerate(nets[1:], 1):
            member.init_weights(torch.Generator().manual_seed(seed + 1000 * k))
        net = Mean(nets)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.5, 0.95), weight_decay=float(extra.get("wd", 0.01)))
    g = torch.Generator().manual_seed(seed + 1)
    dec_w, crop, every = float(extra.get("dec", 0)), int(extra.get("crop", 8)), int(extra.get("every", 1))
    lf_w, pool, dc_w = float(extra.get("lf", 0)), int(extra.get("pool", 4)), float(extra.get("dc", 0))
    cw = 1.0
    if dec_w or "cw" in extra:
        from interposer.spaces import get_space
        from interposer.vae import decode_raw, load_vae

        dvae = load_vae(get_space(dst), os.environ.get("VAES", "../shared/vaes") + "/taef2", None,
                        trust_remote_code=True).requires_grad_(False)
    if "cw" in extra:  # L1 weighted per channel by the decoder's sensitivity to the power cw (fx2 targets only)
        cw = channel_weights(dvae, get_space(dst), ys[:32, :, :16, :16], ys.std((0, 2, 3))) ** float(extra["cw"])
        print("channel weights", [round(v, 2) for v in (cw / cw.mean()).tolist()], flush=True)
        cw = (cw / cw.mean()).view(1, -1, 1, 1)
    decay = float(extra.get("ema", 0))
    ema = copy.deepcopy(net) if decay else None
    xs_std = xs.std((0, 2, 3)).view(1, -1, 1, 1)
    start, loss = time.time(), torch.tensor(float("nan"))
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(xs), (16,), generator=g)
        xb, yb = xs[idx], ys[idx]
        if extra.get("aug", "0") == "1":  # the same flip of both sides, for half the batch
            flip = (torch.rand(len(idx), generator=g) < 0.5)[:, None, None, None]
            xb, yb = torch.where(flip, xb.flip(-1), xb), torch.where(flip, yb.flip(-1), yb)
        if "noise" in extra:  # Gaussian noise on the input, in units of each channel's spread
            xb = xb + float(extra["noise"]) * xs_std * torch.randn(xb.shape, generator=g)
        outs = [m(xb) for m in net.nets] if isinstance(net, Mean) else [net(xb)]
        pred = torch.stack(outs).mean(0)
        loss = sum((((o - yb) ** 2) if extra.get("loss") == "mse" else (o - yb).abs()).mul(cw).mean()
                   for o in outs) / len(outs)
        if dc_w:
            loss = loss + dc_w * F.l1_loss(pred.mean((2, 3)), yb.mean((2, 3)))
        if lf_w:
            loss = loss + lf_w * F.l1_loss(F.avg_pool2d(pred, pool), F.avg_pool2d(yb, pool))
        if dec_w and step % every == 0:
            o = torch.randint(0, pred.shape[-1] - crop + 1, (2,), generator=g).tolist()
            window = (..., slice(o[0], o[0] + crop), slice(o[1], o[1] + crop))
            with torch.no_grad():
                target_image = decode_raw(dvae, get_space(dst), yb[window])
            loss = loss + dec_w * F.l1_loss(decode_raw(dvae, get_space(dst), pred[window]), target_image)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                d = min(decay, (1 + step) / (10 + step))
                for a, b in zip(ema.parameters(), net.parameters()):
                    a.lerp_(b, 1 - d)
                for a, b in zip(ema.buffers(), net.buffers()):
                    a.lerp_(b, 1 - d) if a.is_floating_point() else a.copy_(b)
    ms = 1000 * (time.time() - start) / max(steps, 1)
    net = (ema or net).eval()
    if "save" in extra:
        torch.save(net.state_dict(), extra["save"])
    with torch.no_grad():
        pred = net(xt)
        w, b = fit_linear(xs, ys, scale)
        lin = apply_linear(w, b, xt, scale)
    out = (f"{src}->{dst} {arch} lr={lr} {extra} steps={steps}: test L1 {(pred - yt).abs().mean():.4f} "
           f"(linear {(lin - yt).abs().mean():.4f}) train loss {loss.item():.4f} step {ms:.0f} ms")
    if dst == "fx2":  # decoded by taef2, against the original photo crop
        from interposer.spaces import get_space
        from interposer.vae import decode_raw, load_vae

        vae = load_vae(get_space("fx2"), os.environ.get("VAES", "../shared/vaes") + "/taef2", None,
                       trust_remote_code=True)
        manifest = read_manifest(f"{data}/data-test")
        photo = torch.from_numpy(np.stack([_original(r, manifest) for r in te.rows.to_pylist()]))
        photo = photo.permute(0, 3, 1, 2).float()

        def psnr(z):
            image = (decode_raw(vae, get_space("fx2"), z).clamp(-1, 1) + 1) / 2
            return (10 * torch.log10(1 / ((image - photo) ** 2).flatten(1).mean(1))).mean().item()

        def delta_e(z):  # CIEDE2000 of mean colours, as `interposer eval` reports it
            images = (decode_raw(vae, get_space("fx2"), z).clamp(-1, 1) + 1) / 2
            pairs = zip(images.permute(0, 2, 3, 1).double().numpy(), photo.permute(0, 2, 3, 1).double().numpy())
            each = np.array([mean_delta_e(a, b) for a, b in pairs])
            if "each" in extra:  # the mean per held-out photo
                names = np.array(photo_names(te.rows))
                print({n: round(float(each[names == n].mean()), 2) for n in sorted(set(names))}, flush=True)
            return float(each.mean())

        out += (f" PSNR {psnr(pred):.2f} (linear {psnr(lin):.2f}, taef2's own {psnr(yt):.2f})"
                f" dE {delta_e(pred):.2f} (linear {delta_e(lin):.2f}, taef2's own {delta_e(yt):.2f})")
        if extra.get("split") == "1":  # coarse (the source's grid) against fine: which part the errors are in
            k = yt.shape[-1] // xt.shape[-1]
            coarse = lambda z: F.interpolate(F.avg_pool2d(z, k), scale_factor=k, mode="nearest")  # noqa: E731
            with torch.no_grad():
                train_pred = net(xs[:256])
            for name, z in (("true coarse", coarse(yt)), ("true coarse + net's detail", coarse(yt) + pred - coarse(pred)),
                            ("net's coarse + true detail", coarse(pred) + yt - coarse(yt))):
                print(f"  {name}: PSNR {psnr(z):.2f} dE {delta_e(z):.2f}", flush=True)
            pooled = lambda a, b: (F.avg_pool2d(a, k) - F.avg_pool2d(b, k)).abs().mean().item()  # noqa: E731
            print(f"  L1 of {k}x{k}-pooled latents: net test {pooled(pred, yt):.4f}, train (256 tiles) "
                  f"{pooled(train_pred, ys[:256]):.4f}; linear test {pooled(lin, yt):.4f}", flush=True)
    print(out, flush=True)


if __name__ == "__main__":
    main()
