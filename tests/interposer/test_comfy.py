import json
import shutil
import textwrap

import torch

from helpers import ROOT, run
from interposer.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, LatentInterposer

# What ComfyUI's loader does with a folder in custom_nodes/: import its __init__.py by location, under the
# folder's name (not importable as a normal module name), then look up NODE_CLASS_MAPPINGS.
LOAD_AS_CUSTOM_NODE = textwrap.dedent("""
    import importlib.util, json, sys, types
    from pathlib import Path
    root, io_path, fake_comfy = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if fake_comfy != "-":  # ComfyUI's folder_paths module, as ComfyUI provides it
        fp = types.ModuleType("folder_paths")
        fp.models_dir = fake_comfy
        sys.modules["folder_paths"] = fp
    spec = importlib.util.spec_from_file_location("SD-Latent-Interposer", root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["SD-Latent-Interposer"] = module
    spec.loader.exec_module(module)
    heavy = sorted(m for m in ("ray", "diffusers") if m in sys.modules)
    node = module.NODE_CLASS_MAPPINGS["LatentInterposer"]()
    from safetensors.torch import load_file
    io = load_file(io_path)
    mask = __import__("torch").ones(2, 1, 128, 192)
    (out,) = getattr(node, node.FUNCTION)({"samples": io["input"], "noise_mask": mask}, "xl", "v1")
    err = (out["samples"] - io["output"]).abs().max().item()
    print(json.dumps({"heavy": heavy, "err": err, "keys": sorted(out)}))
""")


def _run_node(tmp_path, reference, home, fake_comfy="-"):
    script = tmp_path / "load_node.py"
    script.write_text(LOAD_AS_CUSTOM_NODE)
    result = run(str(script), str(ROOT), str(reference / "xl-to-v1_io.safetensors"), fake_comfy,
                 env={"INTERPOSER_HOME": str(home)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_loads_as_a_cloned_custom_node_without_ray_or_diffusers(tmp_path, reference):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(reference / "xl-to-v1_interposer-v4.0.safetensors", home)
    report = _run_node(tmp_path, reference, home)
    assert report["heavy"] == []
    assert report["err"] <= 1e-5
    assert report["keys"] == ["noise_mask", "samples"]  # other LATENT keys pass through


def test_finds_weights_in_comfyui_models_folder(tmp_path, reference):
    models = tmp_path / "ComfyUI" / "models"
    (models / "interposers").mkdir(parents=True)
    shutil.copy(reference / "xl-to-v1_interposer-v4.0.safetensors", models / "interposers")
    report = _run_node(tmp_path, reference, tmp_path / "empty-home", fake_comfy=str(models))
    assert report["err"] <= 1e-5


def test_node_api_in_process(isolated_home, reference, ref_io):
    assert NODE_CLASS_MAPPINGS == {"LatentInterposer": LatentInterposer}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"LatentInterposer": "Latent Interposer"}
    inputs = LatentInterposer.INPUT_TYPES()["required"]
    assert inputs["samples"] == ("LATENT",)
    assert {"v1", "xl", "v3", "fx", "ca"} <= set(inputs["latent_src"][0]) == set(inputs["latent_dst"][0])
    assert (LatentInterposer.RETURN_TYPES, LatentInterposer.CATEGORY) == (("LATENT",), "latent")
    shutil.copy(reference / "ca-to-xl_interposer-v4.0.safetensors", isolated_home)
    x, expected = ref_io("ca-to-xl")
    node = LatentInterposer()
    (out,) = node.convert({"samples": x, "noise_mask": torch.ones(2, 1, 128, 160), "batch_index": [0, 1]}, "ca", "xl")
    assert (out["samples"] - expected).abs().max() <= 1e-5
    assert "noise_mask" not in out and out["batch_index"] == [0, 1]  # the mask no longer fits 0.5x latents


def test_importing_the_package_stays_light(tmp_path):
    code = "import sys, interposer, interposer.cli, interposer.comfy; " \
           "print(sorted(m for m in ('ray', 'diffusers', 'PIL', 'pyarrow') if m in sys.modules))"
    result = run("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_choices_and_the_missing_weights_message_speak_comfyui(isolated_home, tmp_path, monkeypatch):
    import types

    import pytest

    from interposer.weights import WeightsNotFoundError

    models = tmp_path / "ComfyUI" / "models"
    (models / "interposers").mkdir(parents=True)
    monkeypatch.setitem(__import__("sys").modules, "folder_paths", types.SimpleNamespace(models_dir=str(models)))
    inputs = LatentInterposer.INPUT_TYPES()["required"]
    # city96's choices, so saved workflows keep loading; no pair without weights anywhere is offered beyond them
    assert inputs["latent_src"][0] == inputs["latent_dst"][0] == ["v1", "xl", "v3", "fx", "ca"]
    with pytest.raises(WeightsNotFoundError, match=r"^no weights for xl -> v1 here: download "
                                                   r"xl-to-v1_interposer-v4.0.safetensors .* into .*ComfyUI/models/"
                                                   r"interposers$"):
        LatentInterposer().convert({"samples": torch.randn(1, 4, 8, 8)}, "xl", "v1")
    with pytest.raises(WeightsNotFoundError, match=r"city96 released none for this pair"):
        LatentInterposer().convert({"samples": torch.randn(1, 4, 8, 8)}, "v1", "ca")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ComfyUI", "interposer-home", "interposers", "models"]
    (models / "interposers" / "v1-to-wan").mkdir()  # a local model for another space: then it is offered
    assert LatentInterposer.INPUT_TYPES()["required"]["latent_dst"][0][-1] == "wan"


def test_a_local_model_puts_its_space_in_the_lists_once(isolated_home, tmp_path, monkeypatch):
    """Its code comes from both its folder name and its config.json: offered once (ComfyUI showed it twice)."""
    import types

    from interposer import InterposerModel, save_interposer

    models = tmp_path / "ComfyUI" / "models"
    monkeypatch.setitem(__import__("sys").modules, "folder_paths", types.SimpleNamespace(models_dir=str(models)))
    save_interposer(InterposerModel(4, 16, 8, 1), models / "interposers" / "v1-to-wan", "v1", "wan")
    inputs = LatentInterposer.INPUT_TYPES()["required"]
    assert inputs["latent_src"][0] == inputs["latent_dst"][0] == ["v1", "xl", "v3", "fx", "ca", "wan"]
