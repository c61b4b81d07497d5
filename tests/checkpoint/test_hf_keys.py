"""Checkpoint loading: layout detection, dtype casts, and one clear error per fault naming tensor and file."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from hf_models import make_hf_model, save_layout
from safetensors.torch import load_file, save_file

from aria_jax import Aria
from aria_jax.checkpoint.hf_keys import detect_layout, to_hub_name
from aria_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile
from aria_jax.model.schema import tensor_specs

LAYER0_Q = "language_model.model.layers.0.self_attn.q_proj.weight"


def copy_checkpoint(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("layout", ["hub", "transformers5", "original"])
def test_layouts_detected_and_renamed_onto_the_full_spec(layout, checkpoint, aria_model):
    directory = checkpoint("gqa", layout)
    keys = list(load_file(os.path.join(directory, "model.safetensors")))
    assert detect_layout(keys) == layout
    names = {to_hub_name(k, layout) for k in keys}
    specs = tensor_specs(aria_model("gqa").config)
    assert set(specs) <= names  # every expected tensor is found under its hub name
    assert names - set(specs) <= {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"} | {
        n for n in names if n.endswith("inv_freq")
    }


def test_bfloat16_cast_is_bit_identical_to_torch(checkpoint):
    directory = checkpoint("gqa", "hub")
    model = Aria.from_pretrained(directory, dtype="bfloat16")
    ref = load_file(os.path.join(directory, "model.safetensors"))[LAYER0_Q].to(torch.bfloat16)
    ours = np.asarray(model.stacked_params()["language_model"]["layers"]["self_attn"]["q_kernel"][0])
    ref_bits = ref.view(torch.int16).numpy().T.reshape(ours.shape)
    np.testing.assert_array_equal(ours.view(np.int16), ref_bits)
    assert ours.dtype == ml_dtypes.bfloat16


def test_bfloat16_checkpoint_keeps_its_dtype_by_default(tmp_path):
    directory = save_layout(make_hf_model("top1").to(torch.bfloat16), "hub", str(tmp_path / "bf16"))
    assert Aria.from_pretrained(directory).dtype == np.dtype(ml_dtypes.bfloat16)
    assert Aria.from_pretrained(directory, dtype="float32").dtype == np.float32


def rewrite(directory: str, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_tensor_named(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("gqa"), tmp_path / "c")
    rewrite(directory, lambda s: s.pop(LAYER0_Q))
    with pytest.raises(CheckpointError, match=rf"{directory}: missing tensor '{LAYER0_Q}'"):
        Aria.from_pretrained(directory)


def test_unexpected_tensor_named_with_its_file(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("gqa"), tmp_path / "c")
    rewrite(directory, lambda s: s.update({"language_model.model.layers.9.mlp.router.weight": torch.zeros(4, 64)}))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: unexpected tensor 'language_model.model.layers.9.mlp.router.weight'"
    ):
        Aria.from_pretrained(directory)


def test_misshaped_tensor_named_with_both_shapes(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("gqa", "transformers5"), tmp_path / "c")
    key = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    rewrite(directory, lambda s: s.update({key: s[key][:, :, :32].contiguous()}))
    with pytest.raises(
        CheckpointError,
        match=rf"model.safetensors: tensor '{key}' has shape \[4, 64, 32\], config.json implies \[4, 64, 64\]",
    ):
        Aria.from_pretrained(directory)


def test_truncated_file(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("gqa"), tmp_path / "c")
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(CheckpointError, match=rf"{path}: truncated file: tensor '.*' ends at byte"):
        Aria.from_pretrained(directory)


def test_corrupt_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((100).to_bytes(8, "little") + b"{" * 100 + b"\0" * 64)
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt safetensors header \(not JSON\)"):
        SafetensorsFile(path)
    path.write_bytes((10**12).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header \(length"):
        SafetensorsFile(path)


def test_missing_shard_of_an_index(hf_model, tmp_path):
    directory = save_layout(hf_model("gqa"), "hub", str(tmp_path / "s"), max_shard_size="20KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(directory, victim))
    with pytest.raises(CheckpointError, match=rf"{victim}: shard listed in .*index.json is missing"):
        Aria.from_pretrained(directory)


def test_pickles_are_not_loaded(checkpoint, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(os.path.join(checkpoint("gqa"), "config.json"), directory)
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        CheckpointError, match="no .safetensors files .*pytorch_model.bin: pickled checkpoints are not loaded"
    ):
        Aria.from_pretrained(directory)


def test_unknown_layout(checkpoint, tmp_path):
    directory = tmp_path / "other"
    directory.mkdir()
    shutil.copy(os.path.join(checkpoint("gqa"), "config.json"), directory)
    save_file({"encoder.weight": torch.zeros(2)}, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown key layout .*encoder.weight"):
        Aria.from_pretrained(directory)


def test_not_a_directory_or_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        Aria.from_pretrained(str(tmp_path / "nowhere" / "x"))
