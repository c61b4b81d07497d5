"""``python train.py`` as two processes (four CPU devices each, jax.distributed over gloo on 127.0.0.1) on a mesh
spanning all eight devices gives the metrics of one process with eight devices.

Each process builds only its own rows of every global batch; Orbax saves collectively; process 0 alone prints,
writes metrics.jsonl and exports.
"""

import glob
import json

import numpy as np
import pytest
from train_helpers import read_metrics, run_train, run_train_processes, write_dataset

FLOATS = ("loss", "lm_loss", "grad_norm", "aux_loss", "z_loss", "learning_rate")
EXACT = ("step", "epoch", "label_tokens", "tokens", "dropped_samples", "skipped_samples")


def _load_export(out):
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(glob.glob(str(out / "export" / "model" / "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def _compare(two, one):
    got, ref = read_metrics(two), read_metrics(one)
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref, strict=True):
        for key in EXACT:
            assert a[key] == b[key], (key, a, b)
        for key in FLOATS:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1e-12, abs(b[key])), (key, a, b)
    assert ref[-1]["lm_loss"] < ref[0]["lm_loss"]
    exported, reference = _load_export(two), _load_export(one)
    assert exported.keys() == reference.keys() and exported
    for k, v in reference.items():
        e = exported[k].astype(np.float64)
        if k.endswith("in_proj_bias"):  # the key bias: its gradient is 0 up to rounding, which AdamW scales up
            d = len(v) // 3
            e, v = np.concatenate([e[:d], e[2 * d:]]), np.concatenate([v[:d], v[2 * d:]])
        assert np.abs(e - v).max() <= 1e-5 * max(1e-12, np.abs(v).max()), k


def _run_both(tmp_path, args):
    two, one = tmp_path / "two", tmp_path / "one"
    results = run_train_processes([*args, f"output_dir={two}"], tmp_path, n=2, devices=4, timeout=900)
    for pid, (code, _out, err) in enumerate(results):
        assert code == 0, f"process {pid}:\n{err[-3000:]}"
    assert "done: step 4" in results[0][1] and "done" not in results[1][1]  # only process 0 prints
    single = run_train([*args, f"output_dir={one}"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                                      "JAX_PLATFORMS": "cpu"}, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]
    return two, one


COMMON = ["max_steps=4", "save_steps=2", "export=true", "mesh=data=2,expert=4"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    two, one = _run_both(tmp_path, ["--config", "configs/tiny_cpu.yaml", *COMMON])
    _compare(two, one)


@pytest.mark.slow
def test_two_processes_train_like_one_on_jsonl_with_images_and_drops(tmp_path, chat_dir):
    # Samples with 0, 1 and 2 images (so the two processes' rows bring different image counts), and a
    # max_seq_length that drops some samples: both processes must agree on every batch.
    data = write_dataset(tmp_path / "ds", n=12)
    late = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello world " * 12}, {"type": "image"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}],
            "images": ["images/img0.png"]}  # its image starts past max_seq_length: dropped
    # and a sample whose image is an empty file: left out before step 0 by every process alike (skip_bad_samples)
    broken = {**late, "images": ["images/empty.png"]}
    open(f"{data}/images/empty.png", "wb").close()
    with open(f"{data}/train.jsonl", "a") as f:
        f.write((json.dumps(late) + "\n") * 3 + json.dumps(broken) + "\n")
    args = [f"model_name_or_path={chat_dir[0]}", f"dataset_mixer={{{data}: 1}}", "max_image_size=490",
            "max_seq_length=32", "per_device_train_batch_size=4", "gradient_accumulation_steps=1",
            "learning_rate=1e-3", "warmup_ratio=0", "logging_steps=1", "skip_bad_samples=true", *COMMON]
    two, one = _run_both(tmp_path, args)
    _compare(two, one)
    assert read_metrics(one)[-1]["dropped_samples"] > 0
    assert read_metrics(one)[-1]["skipped_samples"] == 1
