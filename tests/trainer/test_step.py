import math

import pytest
import torch
import torch.nn.functional as F

from interposer.trainer.config import TrainConfig
from interposer.trainer.step import build_models, build_optim, compute_losses, lr_factor, train_step


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.of(**dict(dict(ch_mid=16, blocks=2, batch=8, crop=8, steps=100, fconst=60), **kw))


def test_lr_schedule():
    cfg = _cfg()
    assert lr_factor(0, cfg) == lr_factor(59, cfg) == 1.0
    floor = 1e-8 / cfg.optim.lr
    assert lr_factor(80, cfg) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-9)
    assert lr_factor(100, cfg) * cfg.optim.lr == pytest.approx(1e-8)
    opt, sched = build_optim(cfg, torch.nn.Linear(2, 2))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[59] == 5e-4 and lrs[61] < 5e-4 and lrs[-1] < lrs[80] < lrs[61]


def test_loss_falls_on_a_fixed_batch():
    cfg = _cfg(lr=2e-3)
    torch.manual_seed(0)
    primary, secondary = build_models(cfg)
    src = torch.randn(8, 4, 8, 8)
    dst = torch.tanh(src.flip(1) * 0.7) + 0.1  # a fixed, learnable map
    optims = [build_optim(cfg, primary)]
    first = train_step(cfg, primary, secondary, optims, src, dst, torch.device("cpu")).parts["p"]
    for step in range(60):
        last = train_step(cfg, primary, secondary, optims, src, dst, torch.device("cpu"), step=step).parts["p"]
    assert last < 0.5 * first


def test_loss_combinations_are_the_v4_ones():
    cfg = _cfg(p_loss_weight=1.0, b_loss_weight=1.0, r_loss_weight=1.4, h_loss_weight=0.5, dc_loss_weight=2.0)
    primary, secondary = build_models(cfg)
    primary.eval(), secondary.eval()  # no dropout: compare with the formulas exactly
    src, dst = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    losses = compute_losses(cfg, primary, secondary, src, dst)
    with torch.no_grad():
        p, s = primary(src), secondary(dst)
        expected = dict(p=F.l1_loss(p, dst), b=F.l1_loss(s, src), r=F.l1_loss(secondary(p), src),
                        h=F.l1_loss(primary(s), dst), dc=F.l1_loss(p.mean((2, 3)), dst.mean((2, 3))))
    assert set(losses.parts) == set(expected)
    for k, v in expected.items():
        assert losses.parts[k] == pytest.approx(v.item(), rel=1e-5), k
    total = 1.0 * expected["p"] + 1.0 * expected["b"] + 1.4 * expected["r"] + 0.5 * expected["h"] + 2.0 * expected["dc"]
    assert losses.total.item() == pytest.approx(total.item(), rel=1e-5)
    only_p = compute_losses(_cfg(), primary, secondary, src, dst)
    assert set(only_p.parts) == {"p"}


def test_decoded_loss_reaches_the_primary_through_a_frozen_decoder(vaes):
    from interposer.spaces import get_space
    from interposer.vae import load_vae

    vae = load_vae(get_space("v1"), str(vaes["v1"]), None)
    cfg = _cfg(src="xl", dst="v1", decoded_loss_weight=1.0, decoded_every=2, decoded_crop=4)
    primary, secondary = build_models(cfg)
    src, dst = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    losses = compute_losses(cfg, primary, secondary, src, dst, decoder=lambda z: vae.decode(z).sample, step=0)
    assert losses.parts["decoded"] > 0
    losses.total.backward()
    assert primary.tail.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())  # the decoder stays frozen
    skipped = compute_losses(cfg, primary, secondary, src, dst, decoder=lambda z: vae.decode(z).sample, step=1)
    assert "decoded" not in skipped.parts  # every decoded_every steps only


def test_models_are_a_function_of_the_seed():
    a, _ = build_models(_cfg(seed=3))
    torch.manual_seed(12345)  # whatever the global RNG holds
    b, _ = build_models(_cfg(seed=3))
    c, _ = build_models(_cfg(seed=4))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.tail.bias, c.tail.bias)
