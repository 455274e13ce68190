"""The universal interposer trained with Ray Train on a real local Ray session: 2 CPU workers (gloo, DDP), a
dataset of three spaces (/8, /4 Cascade, /8 with 32 channels) built by the pipeline from stand-in VAEs."""

import json
import os
import re
import signal

import pytest
import torch

from interposer import convert, load_interposer
from interposer.pipeline.build import BuildConfig, build
from interposer.trainer.config import TrainConfig
from interposer.trainer.driver import RunSpec, train
from interposer.universal_model import UniversalInterposer

from helpers import assert_same_export, wait_for_checkpoint

SPACES = ("xl", "ca", "fx2")
# crop 4 grid pixels of 8 px: 32 px, i.e. 4 xl / fx2 pixels and 8 Cascade pixels
UNI = dict(arch="universal", ch_mid=8, blocks=1, emb=4, batch=8, crop=4, steps=40, fconst=20, checkpoint_every=10,
           eval_every=20, log_every=20, val_fraction=0.2, workers=2, max_failures=3)
FLAGS = ["--universal", "--ch-mid", "8", "--blocks", "1", "--emb", "4", "--batch", "8", "--crop", "4", "--steps", "40",
         "--fconst", "20", "--checkpoint-every", "10", "--eval-every", "20", "--log-every", "20", "--val-fraction",
         "0.2", "--workers", "2", "--max-failures", "3"]


@pytest.fixture(scope="module")
def three(ray_session, photos, vaes, tmp_path_factory):
    out = tmp_path_factory.mktemp("universal-data") / "three"
    build(BuildConfig(images=[str(photos)], spaces=[f"{c}={vaes[c]}" for c in SPACES], out=str(out), tile_size=64,
                      max_tiles=6, min_size=64, shard_size=2, quiet=True))
    return out


@pytest.fixture(scope="module")
def uni_run(three, tmp_path_factory):
    runs = tmp_path_factory.mktemp("universal-runs")
    train(TrainConfig.of(**UNI), RunSpec(str(three), str(runs), "uni"))
    return runs / "uni"


def test_trains_every_pair_and_exports_one_universal_model(uni_run, three, capsys):
    export = uni_run / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "interposer-universal"
    assert sorted(config["pairs"]) == sorted(f"{a}->{b}" for a in SPACES for b in SPACES if a != b)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]  # no released layout
    record = json.loads((uni_run / "interposer-run.json").read_text())
    assert record["config"]["universal"]["spaces"] == "ca,fx2,xl"  # the dataset's and record["finished"] == 40

    net = load_interposer(str(export))
    assert isinstance(net, UniversalInterposer) and list(net.spaces) == ["ca", "fx2", "xl"]
    x = torch.randn(1, 4, 16, 16)  # Cascade latents of 64 px
    with torch.no_grad():
        want = net(x, "ca", "fx2")
    assert want.shape == (1, 32, 8, 8)
    torch.testing.assert_close(convert(x, "ca", "fx2", weights=export), want, rtol=1e-5, atol=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(uni_run / "tensorboard"))
    board.Reload()
    tags = board.Tags()["scalars"]
    assert {f"val_l1/{a}->{b}" for a in SPACES for b in SPACES if a != b} <= set(tags)
    assert [e.step for e in board.Scalars("val_l1/ca->fx2")] == [20, 40]
    losses = [e.value for e in board.Scalars("loss")]
    assert losses[-1] < losses[0], losses  # it learns

    train(TrainConfig.of(**UNI), RunSpec(str(three), str(uni_run.parent), "uni"))
    assert "already finished at step 40; nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_resumes_bit_exactly(uni_run, three, ray_session, tmp_path, capsys):
    from helpers import start_train

    runs = tmp_path / "runs"
    runs.mkdir()
    proc = start_train(runs, "killed", ray_session, "--data", str(three), *FLAGS)
    steps = wait_for_checkpoint(runs / "killed", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(steps) < UNI["steps"], "the kill should land mid-run"
    assert not (runs / "killed" / "export").exists()
    capsys.readouterr()
    train(TrainConfig.of(**UNI), RunSpec(str(three), str(runs), "killed"))
    out = capsys.readouterr().out
    resumed = re.search(r"resumed from step (\d+)", out)
    assert "(resuming)" in out and resumed and int(resumed.group(1)) >= max(steps), out
    assert_same_export(runs / "killed", uni_run)


@pytest.mark.parametrize("argv, message", [
    (["--universal", "--src", "xl"], "give --spaces A,B,... instead of --src/--dst"),
    (["--universal", "--arch", "v4"], "--universal and --arch v4 ask for different networks"),
    (["--steps", "2"], "give --src and --dst (the pair to train), or --universal"),
    (["--universal", "--spaces", "xl,v1"], "has no v1 latents; it has ca, fx2, xl"),
    (["--universal", "--spaces", "xl"], "a universal run needs at least two spaces"),
    (["--universal", "--pair-weights", "xl->v3=2"], "--pair-weights names xl->v3, not a pair of this run's spaces"),
    (["--universal", "--grid", "2", "--crop", "3"], "must cover whole latent pixels of every space: a multiple of 4"),
    (["--universal", "--crop", "16"], "--crop 16 (working-grid pixels of 8 px) is larger than the 64 px tiles"),
    (["--universal", "--r-loss-weight", "1"], "a universal run trains the conversion loss (p) only"),
])  # fmt: skip
def test_cli_mistakes_exit_2_and_write_nothing(argv, message, three, tmp_path):
    from helpers import run

    result = run("-m", "interposer", "train", "--data", str(three), "--out", str(tmp_path / "runs"), "--name", "bad",
                 *argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_weights_of_every_pair_are_drawn_as_asked(three):
    from interposer.trainer.data import TileReader, UniversalStream
    from interposer.trainer.universal import pair_draws

    cfg = TrainConfig.of(**(UNI | dict(spaces="xl,ca,fx2", pair_weights="ca->fx2=4,xl->ca=0")))
    pairs, weights = pair_draws(cfg, ["xl", "ca", "fx2"])
    stream = UniversalStream(TileReader(str(three), SPACES, 0.2), pairs, weights, crop=4, grid=8, batch=8, seed=0,
                             rank=0, world=1, prefetch=False)
    counts = {p: 0 for p in pairs}
    for step in range(60):
        for b in stream.next(step):
            counts[(b.src, b.dst)] += len(b.x)
            assert b.x.shape[1:] == (4, 8, 8) if b.src == "ca" else b.x.shape[1:] == (4 if b.src == "xl" else 32, 4, 4)
            assert b.y.shape[-1] == (8 if b.dst == "ca" else 4)
    stream.close()
    assert counts[("xl", "ca")] == 0
    assert counts[("ca", "fx2")] > 2 * max(v for p, v in counts.items() if p != ("ca", "fx2"))
    # the same (seed, step, rank), the same draws
    again = UniversalStream(TileReader(str(three), SPACES, 0.2), pairs, weights, crop=4, grid=8, batch=8, seed=0,
                            rank=0, world=1, prefetch=False)
    first = again.next(0)
    again.close()
    fresh = UniversalStream(TileReader(str(three), SPACES, 0.2), pairs, weights, crop=4, grid=8, batch=8, seed=0,
                            rank=0, world=1, prefetch=False)
    assert all(torch.equal(a.x, b.x) and (a.src, a.dst) == (b.src, b.dst) for a, b in zip(first, fresh.next(0)))
    fresh.close()


def test_eval_takes_a_pair_or_every_pair_of_a_universal_run(uni_run, three, tmp_path):
    from helpers import run
    from interposer.trainer.data import PairReader

    result = run("-m", "interposer", "eval", "--model", str(uni_run), "--data", str(three), "--src", "ca", "--dst",
                 "xl", "--limit", "4", "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "eval.json").read_text())
    assert (one["src"], one["dst"]) == ("ca", "xl") and one["tiles"] == 4

    result = run("-m", "interposer", "eval", "--model", str(uni_run), "--data", str(three), "--limit", "4",
                 "--out", str(tmp_path / "all.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "all.json").read_text())
    pairs = [f"{a}->{b}" for a in ("ca", "fx2", "xl") for b in ("ca", "fx2", "xl") if a != b]
    assert [r["pair"] for r in table["rows"]] == pairs and table["tiles"] == 4
    assert "universal model (ca, fx2, xl): 6 pairs, 4 val tiles of 64 px" in result.stdout
    assert all(f"{p:>9}" in result.stdout for p in pairs), result.stdout
    row = table["rows"][pairs.index("ca->xl")]
    assert row["latent_l1"] == next(r["latent_l1"] for r in one["rows"] if r["method"] == "interposer")
    # the figure itself: the same tiles through the network, by hand
    net = load_interposer(str(uni_run / "export"))
    tiles = PairReader(str(three), "fx2", "ca", 0.2).take("val", 4)
    with torch.no_grad():
        want = (net(torch.from_numpy(tiles.src).float(), "fx2", "ca") - torch.from_numpy(tiles.dst).float()).abs()
    got = table["rows"][pairs.index("fx2->ca")]
    assert got["latent_l1"] == pytest.approx(want.mean().item(), rel=1e-5)
    assert got["vs_round_trip"] == pytest.approx(got["latent_l1"] / got["round_trip_l1"])
    result = run("-m", "interposer", "eval", "--model", str(uni_run), "--data", str(three), "--src", "ca")
    assert result.returncode == 2 and "give both --src and --dst (one pair), or neither" in result.stderr


def test_publish_a_universal_run_with_every_pair_in_its_card_and_load_it_back(uni_run, three, monkeypatch, capsys,
                                                                            tmp_path):
    from huggingface_hub import constants

    from fakehub import FakeHub
    from helpers import run
    from interposer.trainer.evaluate import evaluate_universal
    from interposer.trainer.publish import publish

    evaluation = evaluate_universal(str(uni_run / "export"), str(three), limit=2, val_fraction=0.2)
    (tmp_path / "run").mkdir()
    import shutil

    shutil.copytree(uni_run / "export", tmp_path / "run" / "export")  # the shared run stays as it was
    shutil.copy(uni_run / "interposer-run.json", tmp_path / "run")
    (tmp_path / "run" / "export" / "eval.json").write_text(json.dumps(evaluation))
    token = "hf_test_secret_do_not_print"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # for this test only; the endpoint is loopback
    with FakeHub() as hub:
        publish(tmp_path / "run", "me/uni", endpoint=hub.endpoint, stage_dir=tmp_path / "staged")
        assert len(hub.commits) == 1
        assert hub.commits[0]["files"] == ["README.md", "config.json", "eval.json", "model.safetensors"]
        card = (tmp_path / "staged" / "README.md").read_text()
        assert "# Universal latent interposer (ca, fx2, xl)" in card and "(6 pairs)" in card
        assert "Pairs: ca → fx2, ca → xl, fx2 → ca, fx2 → xl, xl → ca, xl → fx2." in card
        for r in evaluation["rows"]:  # the per-pair table, a row each
            assert f"| {r['pair']} | {r['latent_l1']:.4f} | {r['round_trip_l1']:.4f} |" in card
        assert "- latent-space-fx2" in card and str(three) not in (tmp_path / "staged" / "eval.json").read_text()
        out = capsys.readouterr()
        assert token not in out.out + out.err
        env = hub.client_env(tmp_path / "cache")
        code = ("import torch; from interposer import load_interposer; from safetensors.torch import load_file; "
                f"m = load_interposer('me/uni'); w = load_file({str(uni_run / 'export' / 'model.safetensors')!r}); "
                "print(type(m).__name__, ','.join(m.spaces), all(torch.equal(v, m.state_dict()[k]) for k, v in "
                "w.items()))")
        result = run("-c", code, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["UniversalInterposer", "ca,fx2,xl", "True"]


@pytest.fixture(scope="module")
def with_wan(three, vaes, tmp_path_factory):
    """The three-space dataset plus wan latents of the same tiles (`data add-space`): a new space and known ones."""
    import shutil

    from interposer.pipeline.build import AddSpaceConfig, add_space

    out = tmp_path_factory.mktemp("universal-wan") / "four"
    shutil.copytree(three, out)
    add_space(AddSpaceConfig(data=str(out), space=f"wan={vaes['wan']}", quiet=True))
    return out


ADD = UNI | dict(add_space="wan", steps=20, fconst=10, eval_every=10, log_every=10)


def test_add_space_trains_only_the_new_adapters_and_leaves_every_other_pair_bit_identical(uni_run, with_wan, tmp_path,
                                                                                         capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    train(TrainConfig.of(**ADD, base=str(uni_run)), RunSpec(str(with_wan), str(runs), "wan"))
    out = capsys.readouterr().out
    assert "space wan added to" in out and "its 6 pairs with ca, fx2, xl; the rest frozen" in out, out
    base, net = load_interposer(str(uni_run / "export")), load_interposer(str(runs / "wan" / "export"))
    assert list(net.spaces) == ["ca", "fx2", "xl", "wan"]
    old, new = base.state_dict(), net.state_dict()
    trained = {k for k in new if k not in old}
    assert all(torch.equal(old[k], new[k]) for k in old)  # trunk and the old spaces' adapters frozen
    assert trained == {n for n in new if n.startswith(("inputs.wan.", "outputs.wan.", "embed.wan"))}
    share = sum(p.numel() for p in net.space_parameters("wan")) / sum(p.numel() for p in net.parameters())
    assert 0 < share < 1
    sides = {"ca": (4, 16), "fx2": (32, 8), "xl": (4, 8), "wan": (16, 8)}  # channels, side at 64 px
    x = {c: torch.randn(2, ch, s, s, generator=torch.Generator().manual_seed(i)) for i, (c, (ch, s)) in
         enumerate(sides.items())}
    with torch.no_grad():
        for a, b in base.pairs():
            assert torch.equal(net(x[a], a, b), base(x[a], a, b)), f"{a}->{b} changed"
        for c in ("ca", "fx2", "xl"):
            assert net(x["wan"], "wan", c).shape == (2, *((sides[c][0],) + (sides[c][1],) * 2))
            assert net(x[c], c, "wan").isfinite().all()
    board = EventAccumulator(str(runs / "wan" / "tensorboard"))
    board.Reload()
    tags = {t for t in board.Tags()["scalars"] if t.startswith("val_l1/")}
    assert tags == {f"val_l1/{a}->{b}" for a, b in net.pairs() if "wan" in (a, b)}
    # the new space's weights moved from their start (the network the run began with, built as a rank builds it)
    from interposer.trainer.driver import load_base
    from interposer.trainer.universal import universal_network

    cfg = TrainConfig.of(**ADD, base=str(uni_run), spaces="wan,ca,fx2,xl")
    start = dict(universal_network(cfg, ["wan", "ca", "fx2", "xl"], {}, load_base(str(uni_run))[0]).named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in net.named_parameters() if n in trained), "nothing trained"
    record = json.loads((runs / "wan" / "interposer-run.json").read_text())
    assert record["config"]["universal"]["spaces"] == "wan,ca,fx2,xl" and record["finished"] == 20

    train(TrainConfig.of(**ADD, base=str(uni_run)), RunSpec(str(with_wan), str(runs), "wan"))
    assert "already finished at step 20; nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--universal", "--add-space", "wan"], "--add-space NEW and --from RUN go together"),
    (["--from", "UNI", "--src", "xl", "--dst", "ca"], "--from applies to a universal run (--universal)"),
    (["--universal", "--from", "UNI", "--add-space", "xl"], "--add-space xl: UNI already converts xl"),
    (["--universal", "--from", "UNI", "--add-space", "v1"], "has no v1 latents (it has ca, fx2, wan, xl)"),
    (["--universal", "--from", "UNI", "--add-space", "wan", "--spaces", "wan,v3"], "--spaces names v3, not a space of"),
    (["--universal", "--from", "NOWHERE", "--add-space", "wan"], "neither a run folder (with export/) nor a model"),
])  # fmt: skip
def test_add_space_mistakes_exit_2_and_write_nothing(argv, message, uni_run, with_wan, tmp_path):
    from helpers import run

    fill = {"UNI": str(uni_run), "NOWHERE": str(tmp_path / "nowhere")}
    result = run("-m", "interposer", "train", "--data", str(with_wan), "--out", str(tmp_path / "runs"), "--name", "bad",
                 *[fill.get(a, a) for a in argv])
    assert result.returncode == 2, result.stderr
    assert message.replace("UNI", str(uni_run)) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "bad").exists()
