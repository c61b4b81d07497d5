"""Mesh specs, sharding rules, and loading onto an 8-device mesh (virtual CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from hf_models import image_batch

from aria_jax.checkpoint.converted import chunk_shape
from aria_jax.cli import main
from aria_jax.parallel.sharding import MeshError, parse_mesh_spec

# Run with 8 virtual CPU devices: load the HF directory and the converted one on meshes, check placements and
# per-device shard shapes, compare logits with transformers' (saved by the test), and check the error messages.
MESH_SCRIPT = r"""
import json, sys
import numpy as np
import jax
from aria_jax import Aria, AriaConfig
from aria_jax.parallel.sharding import MeshError, param_shardings

hf_dir, converted_dir, data_file = sys.argv[1:4]
data = np.load(data_file)
batch = {k: data[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}
valid = batch["attention_mask"].astype(bool)
ref = data["ref"][valid]
out = {"devices": jax.device_count()}

def summary(model):
    p = model.params["language_model"]
    logits = np.asarray(model.forward(**batch))[valid]
    return {
        "rel_err": float(np.abs(logits - ref).max() / np.abs(ref).max()),
        "gate_up": [str(p["layers"]["mlp"]["gate_up"].sharding.spec),
                    list(p["layers"]["mlp"]["gate_up"].addressable_shards[0].data.shape)],
        "q_kernel": [str(p["layers"]["self_attn"]["q_kernel"].sharding.spec),
                     list(p["layers"]["self_attn"]["q_kernel"].addressable_shards[0].data.shape)],
        "embed": [str(p["embed_tokens"].sharding.spec), list(p["embed_tokens"].addressable_shards[0].data.shape)],
        "vision": str(model.params["vision_tower"]["layers"]["fc1"]["kernel"].sharding.spec),
        "n_devices": len(p["layers"]["mlp"]["gate_up"].sharding.device_set),
    }

spec = "data=2,expert=2,tensor=2"
out["hf"] = summary(Aria.from_pretrained(hf_dir, dtype="float32", mesh=spec))
out["converted"] = summary(Aria.from_pretrained(converted_dir, dtype="float32", mesh=spec))
mesh = jax.make_mesh((4, 2), ("expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
out["mesh_object"] = summary(Aria.from_pretrained(converted_dir, dtype="float32", mesh=mesh))
errors = {}
for name, cfg, spec in [("aria_tensor8", AriaConfig.preset("aria"), "tensor=8"),
                        ("tiny_tensor4", AriaConfig.from_pretrained(hf_dir), "expert=2,tensor=4"),
                        ("too_many", AriaConfig.from_pretrained(hf_dir), "data=4,expert=4")]:
    try:
        param_shardings(cfg, spec)
        errors[name] = None
    except MeshError as e:
        errors[name] = str(e)
out["errors"] = errors
aria = param_shardings(AriaConfig.preset("aria"), "data=2,expert=4")["language_model"]["layers"]["mlp"]["gate_up"]
out["aria_experts"] = str(aria.spec)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_results(checkpoint, hf_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    hf_dir = checkpoint("gqa", "transformers5")
    converted = str(tmp / "converted")
    assert main(["convert", hf_dir, converted, "--quiet"]) == 0
    batch = image_batch("gqa", np.random.default_rng(2))
    with torch.no_grad():
        ref = hf_model("gqa")(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    np.savez(tmp / "data.npz", ref=ref, **batch)
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, hf_dir, converted, str(tmp / "data.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][0]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_loads_onto_a_mesh_with_target_shardings_and_transformers_logits(source, mesh_results):
    got = mesh_results[source]
    assert mesh_results["devices"] == 8 and got["n_devices"] == 8
    assert got["rel_err"] <= 1e-5
    # gqa: 2 layers, 4 experts, d=64, 2*32 expert width, 4 heads x 16, vocab 128.
    assert got["gate_up"] == ["P(None, 'expert', None, None)", [2, 2, 64, 64]]
    assert got["q_kernel"] == ["P(None, None, 'tensor', None)", [2, 64, 2, 16]]
    assert got["embed"] == ["P('tensor', None)", [64, 64]]
    assert got["vision"] == "P(None, None, None)"


def test_accepts_a_mesh_object(mesh_results):
    got = mesh_results["mesh_object"]
    assert got["rel_err"] <= 1e-5
    assert got["gate_up"][1] == [2, 1, 64, 64]


def test_clear_errors_when_heads_or_devices_do_not_fit(mesh_results):
    errors = mesh_results["errors"]
    assert "num_key_value_heads=20 does not divide over mesh axis 'tensor' of size 8" in errors["aria_tensor8"]
    assert "use tensor=1, 2, 4, 5, 10, 20" in errors["aria_tensor8"]
    assert "text num_key_value_heads=2 does not divide over mesh axis 'tensor' of size 4" in errors["tiny_tensor4"]
    assert errors["too_many"] == "mesh 'data=4,expert=4' needs 16 devices, only 8 available"
    assert mesh_results["aria_experts"] == "P(None, 'expert', None, None)"


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,expert=4,tensor=1") == {"data": 2, "expert": 4, "tensor": 1}
    assert parse_mesh_spec(" expert=8 ") == {"expert": 8}
    for bad, message in [
        ("fsdp=2", "unknown axis 'fsdp'; use data, expert, tensor"),
        ("data=0", "'data=0' is not AXIS=SIZE"),
        ("data", "'data' is not AXIS=SIZE"),
        ("data=2,data=2", "axis 'data' given twice"),
        ("", "no axes"),
    ]:
        with pytest.raises(MeshError, match=message):
            parse_mesh_spec(bad)


def test_chunks_split_every_shardable_axis():
    assert chunk_shape((28, 64, 2560, 3328), ("layers", "expert", "expert_embed", "expert_mlp")) == (1, 1, 2560, 3328)
    assert chunk_shape((28, 2560, 20, 128), ("layers", "embed", "q_heads", "head_dim")) == (1, 2560, 1, 128)
    assert chunk_shape((100352, 2560), ("vocab", "embed")) == (4096 // 2, 2560)
    assert chunk_shape((2560,), ("embed",)) == (2560,)


def test_convert_checks_the_mesh_before_writing(checkpoint, tmp_path, capsys):
    assert main(["convert", checkpoint("gqa", "hub"), str(tmp_path / "d"), "--mesh", "tensor=3", "--quiet"]) == 2
    assert "needs 3 devices, only 1 available" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_fsdp_splits_the_largest_free_dimension_over_data():
    from types import SimpleNamespace

    from aria_jax.parallel.sharding import partition_spec

    mesh = SimpleNamespace(shape={"data": 4, "expert": 2, "tensor": 1})
    # Not FSDP: only the rules apply.
    assert tuple(partition_spec(("layers", "embed", "mlp"), (28, 2560, 3328), mesh, "w")) == (None, None, None)
    # FSDP: the largest divisible dimension other than the stacked layers goes to data.
    assert tuple(partition_spec(("layers", "embed", "mlp"), (28, 2560, 3328), mesh, "w", fsdp=True)) == (
        None, None, "data")
    assert tuple(partition_spec(("layers", "expert", "expert_embed", "expert_mlp"), (28, 64, 2560, 3330), mesh, "w",
                                fsdp=True)) == (None, "expert", "data", None)  # 3330 does not divide by 4
    assert tuple(partition_spec(("embed",), (6,), mesh, "norm", fsdp=True)) == (None,)  # nothing divides: replicated
