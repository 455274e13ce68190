import pytest

from interposer.trainer.config import TrainConfig, config_from_dict, load_config


def test_defaults_are_the_v4_xl_to_v1_recipe():
    cfg = TrainConfig()
    assert (cfg.src, cfg.dst, cfg.schedule.steps, cfg.data.batch, cfg.schedule.fconst, cfg.schedule.cosine) == \
        ("xl", "v1", 50_000, 128, 30_000, True)
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2) == (5e-4, 0.5, 0.95)
    loss = cfg.loss
    assert (loss.p_loss_weight, loss.r_loss_weight, loss.b_loss_weight, loss.h_loss_weight) == (1.0, 0.0, 0.0, 0.0)
    assert not cfg.uses_secondary
    assert cfg.model_args() == dict(ch_in=4, ch_out=4, ch_mid=64, blocks=12, scale=1.0)
    assert TrainConfig.of(src="cascade", dst="sdxl").model_args()["scale"] == 0.5


CITY96_V1_TO_XL = """
steps: 50000
batch: 128
fconst: 30000
cosine: true
p_loss_weight: 1.0
r_loss_weight: 1.4
b_loss_weight: 1.0
h_loss_weight: 0.0
eval_model: xl-to-v1_interposer-v4.0.safetensors
save_image: true
device: cuda
resume: null
dataset:
  src: data/v1/latents.bin
  dst: data/xl/latents.bin
model:
  src: v1
  dst: xl
  rev: v4.0
  args:
    ch_in: 4
    ch_out: 4
    ch_mid: 64
    scale: 1.0
    blocks: 12
optim:
  lr: 0.0005
  beta1: 0.5
  beta2: 0.95
"""


def test_city96_yaml_is_used_as_it_is_naming_what_does_not_apply(tmp_path):
    path = tmp_path / "v1-to-xl.yaml"
    path.write_text(CITY96_V1_TO_XL.replace("cosine: true", "cosine: false"))
    with pytest.warns(UserWarning) as caught:
        cfg = load_config(path)
    assert [str(w.message) for w in caught] == [
        f"{path}: ignoring key(s) that do not apply here: dataset.dst (--data), dataset.src (--data), device (--gpu), "
        "eval_model (interposer eval), model.rev (--rev), resume (rerun the same command to resume), save_image "
        "(interposer eval writes eval.json)"]
    assert (cfg.src, cfg.dst, cfg.loss.r_loss_weight, cfg.loss.b_loss_weight, cfg.optim.lr) == \
        ("v1", "xl", 1.4, 1.0, 5e-4)
    assert (cfg.schedule.steps, cfg.data.batch, cfg.schedule.fconst, cfg.schedule.cosine) == (50000, 128, 30000, False)
    assert (cfg.model.ch_mid, cfg.model.blocks, cfg.optim.beta1, cfg.optim.beta2) == (64, 12, 0.5, 0.95)
    assert cfg.uses_secondary
    from interposer.trainer.step import lr_factor

    assert lr_factor(49_999, cfg) == 1.0  # cosine: false is a constant LR
    assert lr_factor(49_999, TrainConfig.of(steps=50_000, fconst=30_000)) < 1e-3
    assert load_config(path, steps=10, src="xl", dst="v1").schedule.steps == 10  # flags override the file
    path.write_text(CITY96_V1_TO_XL.replace("ch_in: 4", "ch_in: 16"))  # the file's own channels must agree
    with pytest.raises(ValueError, match=r"model.args.ch_in is 16, but v1 -> xl needs 4"):
        load_config(path)


def test_grouped_and_flat_keys_are_one_setting():
    flat = config_from_dict({"lr": 1e-3, "steps": 7, "ch_mid": 8})
    grouped = config_from_dict({"optim": {"lr": 1e-3}, "schedule": {"steps": 7}, "model": {"ch_mid": 8}})
    assert flat == grouped == TrainConfig.of(lr=1e-3, steps=7, ch_mid=8)
    assert TrainConfig.from_dict(flat.to_dict()) == flat == TrainConfig.from_dict(flat.flat())
    assert flat.to_dict()["optim"]["lr"] == 1e-3 and flat.flat()["lr"] == 1e-3


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown key\\(s\\) optim.momentum, stepz; known: add_space, arch, b_loss_weight"):
        config_from_dict({"stepz": 1, "optim": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="batch 10 must divide evenly over 3 workers"):
        TrainConfig.of(batch=10, workers=3)
    with pytest.raises(ValueError, match="src and dst are both v1"):
        TrainConfig.of(src="sd15", dst="v1")
    with pytest.raises(ValueError, match="r_loss_weight must not be negative"):
        TrainConfig.of(r_loss_weight=-1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
