import pytest

from trainer.config import TrainConfig, config_from_dict, load_config


def test_defaults_are_the_v4_xl_to_v1_recipe():
    cfg = TrainConfig()
    assert (cfg.src, cfg.dst, cfg.steps, cfg.batch, cfg.fconst, cfg.lr, cfg.beta1, cfg.beta2) == \
        ("xl", "v1", 50_000, 128, 30_000, 5e-4, 0.5, 0.95)
    assert (cfg.p_loss_weight, cfg.r_loss_weight, cfg.b_loss_weight, cfg.h_loss_weight) == (1.0, 0.0, 0.0, 0.0)
    assert not cfg.uses_secondary
    assert cfg.model_args() == dict(ch_in=4, ch_out=4, ch_mid=64, blocks=12, scale=1.0)
    assert TrainConfig(src="cascade", dst="sdxl").model_args()["scale"] == 0.5


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


def test_city96_yaml_is_accepted_naming_what_is_ignored(tmp_path):
    path = tmp_path / "v1-to-xl.yaml"
    path.write_text(CITY96_V1_TO_XL)
    with pytest.warns(UserWarning, match=r"ignoring key\(s\) that do not apply here: cosine, dataset.dst \(--data\), "
                                         r"dataset.src \(--data\), device \(--gpu\), eval_model \(interposer eval\), "
                                         r"model.args.ch_in \(from --src\)"):
        cfg = load_config(path)
    assert (cfg.src, cfg.dst, cfg.r_loss_weight, cfg.b_loss_weight, cfg.lr) == ("v1", "xl", 1.4, 1.0, 5e-4)
    assert cfg.uses_secondary
    with pytest.warns(UserWarning, match=r"resume \(rerun the same command to resume\), save_image$"):
        load_config(path)
    assert load_config(path, steps=10, src="xl", dst="v1").steps == 10  # flags override the file


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown key\\(s\\) optim.momentum, stepz; known: b_loss_weight"):
        config_from_dict({"stepz": 1, "optim": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="batch 10 must divide evenly over 3 workers"):
        TrainConfig(batch=10, workers=3)
    with pytest.raises(ValueError, match="src and dst are both v1"):
        TrainConfig(src="sd15", dst="v1")
    with pytest.raises(ValueError, match="r_loss_weight must not be negative"):
        TrainConfig(r_loss_weight=-1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
