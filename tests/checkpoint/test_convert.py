"""aria-jax convert / export: parity with transformers through every path, bf16 bits, verify, and every fault."""

import json
import os
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import LAYOUTS, REPO, rel_err
from hf_models import image_batch, save_layout
from safetensors.torch import load_file, save_file

from aria_jax import Aria, AriaConfig
from aria_jax.checkpoint.converted import is_converted, restore_params
from aria_jax.cli import main
from aria_jax.model.schema import declared_params, tensor_specs

NAME = "gqa"


def hf_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.float().numpy()


@pytest.fixture(scope="session")
def converted(checkpoint, tmp_path_factory):
    """Cached converted directories by (layout, dtype)."""
    cache = {}

    def get(layout: str = "hub", dtype: str = "float32") -> str:
        if (layout, dtype) not in cache:
            dst = str(tmp_path_factory.mktemp("converted") / f"{layout}-{dtype}")
            assert main(["convert", checkpoint(NAME, layout), dst, "--dtype", dtype, "--quiet"]) == 0
            cache[layout, dtype] = dst
        return cache[layout, dtype]

    return get


@pytest.fixture(scope="session")
def reference(hf_model):
    batch = image_batch(NAME, np.random.default_rng(2))
    return batch, hf_logits(hf_model(NAME), batch), batch["attention_mask"].astype(bool)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_converts_and_reloads_with_transformers_logits(layout, converted, reference):
    dst = converted(layout)
    assert is_converted(dst)
    batch, ref, valid = reference
    out = np.asarray(Aria.from_pretrained(dst, dtype="float32").forward(**batch))
    assert rel_err(out[valid], ref[valid]) <= 1e-5


def test_converted_directory_has_config_and_tokenizer_files(checkpoint, tmp_path, capsys):
    src = shutil.copytree(checkpoint(NAME, "hub"), tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        (src / name).write_text(f"fake {name}")
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert "converted 80 tensors" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        assert (dst / name).read_text() == f"fake {name}"
    written = json.loads((dst / "config.json").read_text())
    assert AriaConfig.from_dict(written) == AriaConfig.from_pretrained(src)
    assert written["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary directory left


def test_bfloat16_conversion_is_bit_identical_to_torch_cast(checkpoint, converted):
    dst = converted("hub", "bfloat16")
    cfg = AriaConfig.from_pretrained(dst)
    params = restore_params(dst, Aria.param_shapes(cfg, "bfloat16"))
    source = load_file(os.path.join(checkpoint(NAME, "hub"), "model.safetensors"))
    checked = set()
    for name, (_, targets) in tensor_specs(cfg).items():
        ref = source[name].to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        for target in targets:
            value = params
            for key in target.path:
                value = value[key]
            value = np.asarray(value if target.layer is None else value[target.layer])
            assert value.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(value.view(np.int16), target.transform(ref).view(np.int16), err_msg=name)
            checked.add(target.path)
    assert len(checked) == 56  # every parameter


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_convert_then_export_loads_in_transformers_with_equal_logits(layout, converted, reference, tmp_path):
    from transformers import AriaForConditionalGeneration

    dst = tmp_path / "exported"
    assert main(["export", converted("original"), str(dst), "--layout", layout, "--max-shard-size", "100KB"]) == 0
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 3
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    text = json.loads((dst / "config.json").read_text())["text_config"]
    if layout == "hub":
        assert "language_model.model.layers.0.mlp.experts.fc1.weight" in index["weight_map"]
        assert "rope_theta" in text and "rope_parameters" not in text
    else:
        assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in index["weight_map"]
        assert text["rope_parameters"]["rope_theta"] == 10000.0
    model = AriaForConditionalGeneration.from_pretrained(str(dst), dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    batch, ref, _ = reference
    np.testing.assert_array_equal(hf_logits(model, batch), ref)  # transforms and inverses are exact


def test_inspect_reports_orbax_layout(converted, capsys):
    assert main(["inspect", converted("hub", "bfloat16")]) == 0
    out = capsys.readouterr().out
    assert "layout:            orbax" in out
    assert "dtypes:            bfloat16 x56" in out
    assert "parameters:        152,416" in out


def test_python_m_convert_runs_the_cli(checkpoint, tmp_path):
    dst = tmp_path / "dst"
    args = [sys.executable, "-m", "convert", checkpoint(NAME, "hub"), str(dst), "--quiet"]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert is_converted(dst)
    help_text = subprocess.run([*args[:3], "--help"], capture_output=True, text=True, cwd=REPO, env=env).stdout
    for flag in ("--dtype", "--verify", "--mesh", "--overwrite", "--allow-pickle", "--revision"):
        assert flag in help_text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_reports_error_and_kl(dtype, checkpoint, tmp_path, capsys):
    assert main(["convert", checkpoint(NAME, "transformers5"), str(tmp_path / "d"), "--dtype", dtype, "--verify"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verify:")][0]
    rel, kl = float(line.split()[4].rstrip(",")), float(line.split()[6])
    assert (rel <= 1e-5) if dtype == "float32" else (kl <= 1e-3)


def test_verify_beyond_tolerance_exits_1_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("aria_jax.cli.verify.FLOAT32_REL_TOL", 0.0)
    assert main(["convert", checkpoint(NAME, "hub"), str(tmp_path / "d"), "--verify", "--quiet"]) == 1
    assert "verify failed: max relative error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_verify_skips_without_transformers(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["convert", checkpoint(NAME, "hub"), str(tmp_path / "d"), "--verify", "--quiet"]) == 0
    assert "verify: skipped: torch/transformers are not installed" in capsys.readouterr().out


def test_failure_while_writing_leaves_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    calls = []

    def boom(self, path, layer, value):
        calls.append(path)
        if len(calls) == 10:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("aria_jax.checkpoint.converted.ParamWriter.write", boom)
    dst = tmp_path / "new" / "parent" / "d"
    assert main(["convert", checkpoint(NAME, "hub"), str(dst), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"aria-jax convert: error: {dst}: cannot write (No space left on device)"]
    assert list(tmp_path.iterdir()) == []


def test_allow_pickle_loads_with_weights_only(checkpoint, reference, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(os.path.join(checkpoint(NAME, "hub"), "config.json"), src)
    torch.save(load_file(os.path.join(checkpoint(NAME, "hub"), "model.safetensors")), src / "pytorch_model.bin")
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--allow-pickle", "--quiet"]) == 0
    batch, ref, valid = reference
    assert rel_err(np.asarray(Aria.from_pretrained(dst).forward(**batch))[valid], ref[valid]) <= 1e-5


# ---- faults: exit status 2, one line naming the file or tensor, no traceback, no DST afterwards ----

Q0 = "language_model.model.layers.0.self_attn.q_proj.weight"


def _edit_tensors(directory, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _truncate_shard(d):
    shard = sorted(d.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return rf"{shard}: truncated file: tensor '.*' ends at byte"


def _remove_shard(d):
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    return rf"{shard}: shard listed in .*index.json is missing"


def _corrupt_header(d):
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return rf"{path}: corrupt safetensors header \(not JSON\)"


def _missing_tensor(d):
    _edit_tensors(d, lambda s: s.pop(Q0))
    return rf"{d}: missing tensor '{Q0}'"


def _unexpected_tensor(d):
    _edit_tensors(d, lambda s: s.update({"language_model.model.layers.7.mlp.router.weight": torch.zeros(4, 64)}))
    return rf"{d / 'model.safetensors'}: unexpected tensor 'language_model.model.layers.7.mlp.router.weight'"


def _config_contradicts_shapes(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["moe_num_experts"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    return r"model.safetensors: tensor 'language_model.model.layers.0.mlp.experts.fc1.weight' has shape \[4, 64, 64\], config.json implies \[8, 64, 64\]"


def _missing_config(d):
    (d / "config.json").unlink()
    return rf"{d / 'config.json'}: no config.json found"


def _unknown_layout(d):
    save_file({"encoder.weight": torch.zeros(2)}, str(d / "model.safetensors"))
    return r"unknown key layout \(expected Aria tensors, found encoder.weight\)"


def _pickle_without_flag(d):
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return rf"{d / 'pytorch_model.bin'}: pickled checkpoint; pass --allow-pickle"


FAULTS = {
    "truncated_shard": (_truncate_shard, True),
    "missing_shard": (_remove_shard, True),
    "corrupt_header": (_corrupt_header, False),
    "missing_tensor": (_missing_tensor, False),
    "unexpected_tensor": (_unexpected_tensor, False),
    "shape_vs_config": (_config_contradicts_shapes, False),
    "missing_config": (_missing_config, False),
    "unknown_layout": (_unknown_layout, False),
    "pickle_without_flag": (_pickle_without_flag, False),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_exits_2_with_one_line(fault, checkpoint, hf_model, tmp_path, capsys):
    make, sharded = FAULTS[fault]
    src = tmp_path / "src"
    if sharded:
        save_layout(hf_model(NAME), "hub", str(src), max_shard_size="20KB")
    else:
        shutil.copytree(checkpoint(NAME, "hub"), src)
    expected = make(src)
    dst = tmp_path / "out" / "dst"
    capsys.readouterr()  # drop transformers' own progress output from building the source
    assert main(["convert", str(src), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aria-jax convert: error: "), err
    assert re.search(expected, err[0]), err[0]
    assert not dst.exists() and not dst.parent.exists()


def test_existing_destination_needs_overwrite_in_a_subprocess(checkpoint, converted, tmp_path):
    """The real CLI process: status 2, one line on stderr, no traceback; DST untouched; --overwrite replaces it."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    args = [sys.executable, "-m", "aria_jax.cli", "convert", checkpoint(NAME, "hub"), str(dst), "--quiet"]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"aria-jax convert: error: {dst}: already exists; pass --overwrite to replace it"
    ]
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", checkpoint(NAME, "hub"), str(dst), "--overwrite", "--quiet"]) == 0
    assert is_converted(dst) and not (dst / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_export_faults_exit_2(converted, tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a directory written by `aria-jax convert`" in capsys.readouterr().err
    assert main(["export", converted("hub"), str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_hub_id_downloads_only_needed_files_at_a_revision(checkpoint, tmp_path, monkeypatch, capsys):
    """The hub path with huggingface_hub.snapshot_download replaced (no test touches the hub)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        if repo_id == "rhymes-ai/Missing":
            raise OSError("offline and not cached")
        return checkpoint(NAME, "hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert main(["convert", "rhymes-ai/Aria", str(tmp_path / "d"), "--revision", "abc123", "--quiet"]) == 0
    repo, revision, patterns = calls[0]
    assert (repo, revision) == ("rhymes-ai/Aria", "abc123")
    assert "*.safetensors" in patterns and "*.bin" not in patterns and "*.jinja" in patterns
    assert main(["convert", "rhymes-ai/Missing", str(tmp_path / "e"), "--quiet"]) == 2
    assert "rhymes-ai/Missing: cannot fetch from the hub (OSError: offline and not cached)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_unchanged_tensors_are_copied_file_to_file(checkpoint, tmp_path, monkeypatch):
    """Expert and embedding tensors stored unchanged (same dtype) skip the host: copied file to file, bytes equal."""
    from aria_jax.checkpoint.converted import ParamWriter

    copied, written = [], []
    real_copy, real_write = ParamWriter.copy_file, ParamWriter.write
    monkeypatch.setattr(ParamWriter, "copy_file", lambda self, p, *a: (copied.append(p), real_copy(self, p, *a)))
    monkeypatch.setattr(ParamWriter, "write", lambda self, p, *a: (written.append(p), real_write(self, p, *a)))
    src = checkpoint(NAME, "transformers5")
    dst = str(tmp_path / "d")
    assert main(["convert", src, dst, "--dtype", "float32", "--quiet"]) == 0
    cfg = AriaConfig.from_pretrained(dst)
    layers = cfg.text.num_hidden_layers
    experts = ("language_model", "layers", "mlp", "gate_up"), ("language_model", "layers", "mlp", "down")
    assert all(copied.count(p) == layers for p in experts)
    assert ("language_model", "embed_tokens") in copied
    assert not set(copied) & set(written)
    assert ("language_model", "lm_head", "kernel") in written  # transposed: through the host
    params = restore_params(dst, declared_params(cfg, np.float32)[0])
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gate_up = tensors["model.language_model.layers.1.mlp.experts.gate_up_proj"].numpy()
    np.testing.assert_array_equal(np.asarray(params["language_model"]["layers"]["mlp"]["gate_up"][1]), gate_up)


def test_file_copy_falls_back_to_sendfile_then_read_write_and_reports_truncation(tmp_path, monkeypatch):
    from aria_jax.checkpoint.converted import _copy_chunk, contiguous_chunks
    from aria_jax.checkpoint.safetensors_io import CheckpointError

    src = tmp_path / "src.bin"
    data = np.random.default_rng(0).integers(0, 255, 10_000, dtype=np.uint8).tobytes()
    src.write_bytes(data)
    _copy_chunk(str(src), 123, 5000, str(tmp_path / "a"))
    assert (tmp_path / "a").read_bytes() == data[123:5123]

    def unsupported(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)  # across filesystems (disk -> tmpfs): sendfile
    sent, real_sendfile = [], os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *a: sent.append(a[3]) or real_sendfile(*a))
    _copy_chunk(str(src), 7, 9000, str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == data[7:9007] and sent
    with pytest.raises(CheckpointError, match=r"src.bin: truncated file: 1000 bytes missing at offset 10000"):
        _copy_chunk(str(src), 1000, 10_000, str(tmp_path / "c"))
    monkeypatch.setattr(os, "sendfile", unsupported)  # neither: read and write
    _copy_chunk(str(src), 11, 9500, str(tmp_path / "d"))
    assert (tmp_path / "d").read_bytes() == data[11:9511]
    with pytest.raises(CheckpointError, match=r"src.bin: truncated file: 1 bytes missing at offset 10000"):
        _copy_chunk(str(src), 1, 10_000, str(tmp_path / "e"))
    assert contiguous_chunks((4, 8, 6), (1, 8, 6)) and contiguous_chunks((4, 8, 6), (1, 2, 6))
    assert not contiguous_chunks((4, 8, 6), (1, 8, 3)) and not contiguous_chunks((4, 8, 6), (2, 1, 6))


def test_conversion_never_traces_the_model(checkpoint, tmp_path, monkeypatch):
    """The layout comes from the config's table (aria_jax.model.schema); tracing the model would cost a second."""
    from aria_jax.model.aria import AriaModel

    def traced(*args, **kwargs):
        raise AssertionError("convert traced the model")

    monkeypatch.setattr(AriaModel, "init", traced)
    monkeypatch.setattr(AriaModel, "apply", traced)
    dst = tmp_path / "d"
    assert main(["convert", checkpoint(NAME, "hub"), str(dst), "--quiet"]) == 0
    assert (dst / "params" / "_METADATA").is_file()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_zarr_metadata_is_what_tensorstore_writes(tmp_path, dtype):
    import jax.numpy as jnp
    import tensorstore as ts

    from aria_jax.checkpoint.converted import _zarr_dtype, zarr_metadata

    np_dtype = np.dtype(jnp.dtype(dtype))
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}, "create": True,
            "metadata": {"shape": [3, 8, 4096], "chunks": [1, 8, 4096], "dtype": _zarr_dtype(np_dtype),
                         "compressor": None, "dimension_separator": "."}}
    ts.open(spec).result()
    written = json.loads((tmp_path / "a" / ".zarray").read_text())
    assert zarr_metadata((3, 8, 4096), (1, 8, 4096), np_dtype) == written
