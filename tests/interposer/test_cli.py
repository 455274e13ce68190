import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run
from interposer.cli import main
from interposer.latent_io import read_latent, write_latent


@pytest.fixture
def xl_home(isolated_home, reference):
    shutil.copy(reference / "xl-to-v1_interposer-v4.0.safetensors", isolated_home)
    return isolated_home


def _fails(capsys, argv, match: str):
    """The command exits 2 with exactly one line on stderr matching `match`."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


def test_convert_comfy_latent(tmp_path, xl_home, ref_io, capsys):
    x, expected = ref_io("xl-to-v1")
    write_latent(tmp_path / "in.latent", x)
    args = ["convert", str(tmp_path / "in.latent"), str(tmp_path / "out.latent"), "--src", "sdxl", "--dst", "v1"]
    assert main(args) == 0
    assert "xl -> v1 (raw): (2, 4, 16, 24) -> (2, 4, 16, 24)" in capsys.readouterr().out
    saved = load_file(str(tmp_path / "out.latent"))
    assert set(saved) == {"latent_tensor", "latent_format_version_0"}  # ComfyUI LoadLatent reads it as raw
    assert (saved["latent_tensor"] - expected).abs().max() <= 1e-5


def test_convert_between_formats(tmp_path, xl_home, ref_io):
    x, expected = ref_io("xl-to-v1")
    save_file({"samples": x.half(), "other": torch.zeros(1)}, str(tmp_path / "in.safetensors"))
    assert main(["convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.npy"), "--src", "xl",
                 "--dst", "v1", "--layout", "raw"]) == 0
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float16 and out.shape == (2, 4, 16, 24)
    np.testing.assert_allclose(out.astype(np.float32), expected.numpy(), atol=2e-2, rtol=2e-2)
    np.save(tmp_path / "in.npy", x.numpy())
    assert main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.safetensors"), "--src", "xl",
                 "--dst", "v1", "--layout", "scaled"]) == 0
    torch.testing.assert_close(read_latent(tmp_path / "out.safetensors"), convert_scaled(x), atol=1e-5, rtol=1e-5)


def convert_scaled(x):
    from interposer import convert

    return convert(x, "xl", "v1", layout="scaled")


def test_old_comfy_latent_is_unscaled(tmp_path):
    x = torch.randn(1, 4, 8, 8)
    save_file({"latent_tensor": x * 0.18215}, str(tmp_path / "old.latent"))  # before the format marker
    torch.testing.assert_close(read_latent(tmp_path / "old.latent"), x)


def test_explicit_weights(tmp_path, reference, ref_io):
    x, expected = ref_io("fx-to-v1")
    write_latent(tmp_path / "in.safetensors", x)
    weights = reference / "fx-to-v1_interposer-v4.0.safetensors"
    assert main(["convert", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"), "--src", "fx",
                 "--dst", "v1", "--weights", str(weights)]) == 0
    assert (read_latent(tmp_path / "o.safetensors") - expected).abs().max() <= 1e-5


def test_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, xl_home, capsys):
    good = tmp_path / "in.latent"
    write_latent(good, torch.randn(1, 4, 8, 8))
    out = tmp_path / "out.latent"
    base = ["convert", str(good), str(out)]
    _fails(capsys, base + ["--src", "sdx", "--dst", "v1"], r"unknown latent space 'sdx'; known spaces: v1")
    _fails(capsys, base + ["--src", "fx", "--dst", "v1"], r"fx latents have 16 channels, but these have 4")
    _fails(capsys, ["convert", str(tmp_path / "missing.latent"), str(out), "--src", "xl", "--dst", "v1"],
           r"missing.latent: no such file")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    _fails(capsys, ["convert", str(tmp_path / "bad.safetensors"), str(out), "--src", "xl", "--dst", "v1"],
           r"not a readable safetensors file")
    _fails(capsys, ["convert", str(good), str(tmp_path / "out.pt"), "--src", "xl", "--dst", "v1"],
           r"unknown output type '.pt'")
    _fails(capsys, ["convert", str(good), str(tmp_path / "no" / "out.latent"), "--src", "xl", "--dst", "v1"],
           r"output folder does not exist")
    _fails(capsys, base + ["--src", "v1", "--dst", "wan"], r"no released interposer for v1 -> wan")
    _fails(capsys, base + ["--src", "xl"], r"the following arguments are required: --dst")
    _fails(capsys, base + ["--src", "xl", "--dst", "v1", "--weights", str(tmp_path / "w.ckpt")], r"weights not found")
    # silent harm refused: NaN/inf input, the input as the output (also through ..), a latent too small
    bad = torch.randn(1, 4, 8, 8)
    bad[0, 1, 2, 3], bad[0, 0, 0, 0] = float("nan"), float("inf")
    write_latent(tmp_path / "nan.latent", bad)
    _fails(capsys, ["convert", str(tmp_path / "nan.latent"), str(out), "--src", "xl", "--dst", "v1"],
           r"latents hold 2 NaN/inf value\(s\) of 256: .*--allow-nonfinite")
    before = good.read_bytes()
    same = tmp_path / "sub" / ".." / "in.latent"
    (tmp_path / "sub").mkdir()
    _fails(capsys, ["convert", str(good), str(same), "--src", "xl", "--dst", "v1"], r"is the input file")
    assert good.read_bytes() == before
    write_latent(tmp_path / "dot.latent", torch.randn(1, 4, 1, 1))
    _fails(capsys, ["convert", str(tmp_path / "dot.latent"), str(out), "--src", "ca", "--dst", "xl"],
           r"latents of 1x1 are too small for ca -> xl \(resampled by 0.5\): at least 2 pixels a side")
    (tmp_path / "sub").rmdir()
    # nothing written: no output, no leftover temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "dot.latent", "in.latent",
                                                          "interposer-home", "nan.latent"]
    assert main(["convert", str(tmp_path / "nan.latent"), str(out), "--src", "xl", "--dst", "v1",
                 "--allow-nonfinite"]) == 0  # asked for: converted; a bad value spreads over the output
    assert not torch.isfinite(read_latent(out)).all()


def test_list_says_where_weights_are(tmp_path, xl_home, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fx2" in out and "qwen-image" in out and "(x - 0.1159) * 0.3611" in out
    lines = {line.split()[0] + line.split()[2]: line for line in out.splitlines() if " -> " in line}
    assert f"local: {xl_home}" in lines["xlv1"]
    assert "not present" in lines["v1xl"]
    assert len(lines) == 12


def test_console_entry_point_and_help(tmp_path):
    script = Path(sys.executable).parent / "interposer"
    assert script.is_file(), "the `interposer` console script is not installed"
    result = run("-m", "interposer", "convert", "--help")
    assert result.returncode == 0
    for flag in ("--src", "--dst", "--weights", "--layout", "--device", "--dtype"):
        assert flag in result.stdout
    result = run("-m", "interposer", "convert", "a.latent", "b.latent", "--src", "xl", "--dst", "v1",
                 env={"INTERPOSER_HOME": str(tmp_path)})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_error_taxonomy_user_machine_bug(tmp_path, monkeypatch, capsys):
    """User mistakes: one line, exit 2 (above). A machine fault: one line, exit 1. A ValueError that our code
    did not raise on purpose is a bug: it keeps its traceback."""
    import interposer.latent_io as latent_io

    good = tmp_path / "in.latent"
    write_latent(good, torch.randn(1, 4, 8, 8))
    argv = ["convert", str(good), str(tmp_path / "out.latent"), "--src", "xl", "--dst", "v1"]

    def missing(path):
        raise ModuleNotFoundError("No module named 'safetensors'", name="safetensors")

    monkeypatch.setattr(latent_io, "read_latent", missing)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'safetensors' is not installed" in err, err

    def no_memory(path):
        raise MemoryError()

    monkeypatch.setattr(latent_io, "read_latent", no_memory)
    assert main(argv) == 1 and "out of memory" in capsys.readouterr().err

    monkeypatch.setattr(latent_io, "read_latent", lambda path: int("not a number"))  # a bug, not in our package
    with pytest.raises(ValueError, match="invalid literal"):
        main(argv)


def test_a_local_looking_path_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    from interposer import load_interposer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no interposer folder 'runs/typo'"):
        load_interposer("runs/typo")


def test_a_ctrl_c_dropped_in_a_finalizer_is_raised_again():
    """Python drops a KeyboardInterrupt raised inside a weakref callback ("Exception ignored"); under load a
    Ctrl-C landed there and the build ran to the end. The command's hook sends it again."""
    import subprocess
    import sys

    # SIGINT as an interactive shell leaves it (a launcher without job control, `cmd &` in a script, hands its
    # children SIGINT ignored, and then no Ctrl-C reaches Python at all)
    code = ("import signal, time, weakref; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from interposer.cli import _keep_ctrl_c; _keep_ctrl_c()\n"
            "class A: pass\n"
            "def cb(_): raise KeyboardInterrupt\n"
            "a = A(); r = weakref.ref(a, cb)\n"
            "try:\n    del a; time.sleep(5); print('not interrupted')\n"
            "except KeyboardInterrupt:\n    print('interrupted')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "interrupted", result.stdout + result.stderr
