"""Training on 8-device meshes (virtual CPU devices, in subprocesses) equals training on one device."""

import pytest
from train_helpers import read_metrics, run_train

ARGS = ["--config", "configs/tiny_cpu.yaml", "max_steps=4", "save_steps=100", "export=false"]
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def _train(out, *extra):
    result = run_train([*ARGS, f"output_dir={out}", *extra], ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("mesh, fsdp", [
    ("data=2,expert=2", "false"),
    pytest.param("expert=4,tensor=2", "false", marks=pytest.mark.slow),
    pytest.param("data=2,expert=2", "true", marks=pytest.mark.slow),
])
def test_mesh_training_equals_one_device(tmp_path, one_device, mesh, fsdp):
    # per_device_train_batch_size is per data-parallel device: half the rows on each of data=2 is one device's batch
    per_device = ["per_device_train_batch_size=2"] if "data=2" in mesh else []
    got = _train(tmp_path / "mesh", f"mesh={mesh}", f"fsdp={fsdp}", *per_device)
    assert len(got) == len(one_device) == 4
    for a, b in zip(got, one_device, strict=True):
        for key in ("loss", "lm_loss", "grad_norm", "aux_loss", "z_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)
    assert one_device[-1]["lm_loss"] < one_device[0]["lm_loss"]


def test_scanned_layers_train_like_per_layer_ones_and_read_their_checkpoints(tmp_path, one_device):
    """``scan_layers=true`` (the GPU/TPU layout) against the CPU default (one parameter tree per layer): the same
    metrics, and a run in one layout resumes from the other's checkpoint (checkpoints are stacked either way)."""
    scanned = _train(tmp_path / "scan", "scan_layers=true", "save_steps=2")
    for a, b in zip(scanned, one_device, strict=True):
        for key in ("loss", "lm_loss", "grad_norm", "aux_loss", "z_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)
    checkpoint = tmp_path / "scan" / "checkpoints" / "2"
    resumed = _train(tmp_path / "resumed", "scan_layers=false", f"resume_from_checkpoint={checkpoint}")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, scanned[2:], strict=True):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)
