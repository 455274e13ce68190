"""Every setting is one dataclass field: its flag, default, help and check come from it (interposer.settings)."""

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from interposer.pipeline.options import AddSpaceConfig, BuildConfig
from interposer.settings import flag_name, given, settings_table
from interposer.trainer.config import (GROUPS, RESUMABLE, TrainConfig, UniversalConfig, add_train_flags,
                                       train_flags_given)

README = Path(__file__).resolve().parents[2] / "README.md"
TRAIN = (TrainConfig, *GROUPS.values())


def _flagged(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _other_value(f, kind):
    """A valid value that is not the field's default."""
    if type(None) in typing.get_args(kind):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        return not f.default
    if typing.get_origin(kind) is typing.Literal:  # (a universal arch is tested with its own settings)
        return next(v for v in reversed(typing.get_args(kind)) if v not in (f.default, "universal"))
    if kind is str:
        return {"spaces": "xl,v1", "pair_weights": "xl->v1=2", "add_space": "fx"}[f.name]
    if kind is int:
        return 7 if f.default is None else (f.default * 2 or 1)
    return 0.25


def _argv(classes) -> tuple[list[str], dict]:
    argv, expected = [], {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in _flagged(cls):
            value = expected[f.name] = _other_value(f, hints[f.name])
            if isinstance(value, bool):  # a flag that is off by default turns on; one that is on turns off
                argv.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
            else:
                argv += [flag_name(f.name), str(value)]
    return argv, expected


def test_every_train_setting_has_a_flag_that_sets_it():
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    argv, expected = _argv([c for c in TRAIN if c is not UniversalConfig])
    assert {"lr", "blocks", "beta1", "cosine", "eval_tiles", "num_to_keep"} <= set(expected)  # once YAML-only
    cfg = TrainConfig.of(**train_flags_given(parser.parse_args(argv)))
    assert {k: cfg.flat()[k] for k in expected} == expected
    assert train_flags_given(parser.parse_args([])) == {}  # not given: the file's value or the default stands
    # a universal run's own settings, with the universal network
    argv, expected = _argv([UniversalConfig])
    cfg = TrainConfig.of(**train_flags_given(parser.parse_args(argv + ["--arch", "universal"])), base="runs/uni")
    assert {k: cfg.flat()[k] for k in expected} == expected and cfg.is_universal
    with pytest.raises(ValueError, match=r"^--spaces applies to a universal run \(--universal\)$"):
        TrainConfig.of(**train_flags_given(parser.parse_args(["--spaces", "xl,v1"])))


@pytest.mark.parametrize("cls", [BuildConfig, AddSpaceConfig])
def test_every_data_option_has_a_flag_that_sets_it(cls, tmp_path):
    parser = argparse.ArgumentParser()
    from interposer.settings import add_flags

    add_flags(parser, cls)
    argv, expected = _argv([cls])
    assert {"batch_size", "dtype", "quiet"} <= set(expected)
    where = dict(images=[str(tmp_path)], spaces=["v1"], out=str(tmp_path / "o")) if cls is BuildConfig else \
        dict(data=str(tmp_path), space="v1")
    opts = cls(**where, **given(parser.parse_args(argv), cls))
    assert {k: getattr(opts, k) for k in expected} == expected


def test_the_readme_table_lists_every_flag_with_its_help():
    readme = README.read_text()
    for classes in (TRAIN, (BuildConfig,)):
        table = settings_table(*classes)
        assert table in readme, f"README's settings table is out of date; paste:\n{table}"


def test_a_bad_value_names_the_setting_and_what_it_must_be(tmp_path):
    with pytest.raises(ValueError, match=r"^steps must be a positive integer, got 0$"):
        TrainConfig.of(steps=0)
    with pytest.raises(ValueError, match=r"^beta2 must be in \[0, 1\), got 1.5$"):
        TrainConfig.of(beta2=1.5)
    with pytest.raises(ValueError, match=r"^arch must be auto, v4, shuffle or universal, got 'v5'$"):
        TrainConfig.of(arch="v5")
    with pytest.raises(ValueError, match=r"^max_failures must be an integer of at least -1, got -2$"):
        TrainConfig.of(max_failures=-2)
    with pytest.raises(ValueError, match=r"^steps must be a positive integer, got '10'$"):  # a YAML string
        TrainConfig.of(steps="10")
    with pytest.raises(ValueError, match=r"^--dtype must be auto, float32, bfloat16 or float16, got 'fp8'$"):
        BuildConfig(images=[str(tmp_path)], spaces=["v1"], out="o", dtype="fp8")
    with pytest.raises(ValueError, match=r"^--gpus-per-worker must be -1 \(auto\), 0 \(CPU\) or a share"):
        AddSpaceConfig(data="d", space="v1", gpus_per_worker=-0.5)


def test_a_resume_may_change_only_what_does_not_change_the_result():
    assert RESUMABLE == {"max_failures", "log_every", "checkpoint_every", "eval_every", "eval_tiles", "num_to_keep",
                         "preemption_check_every", "cpus_per_worker", "fallback_checkpoint"}
