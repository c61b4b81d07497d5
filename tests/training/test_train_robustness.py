"""train.py never loses data and never crashes on bad input (issue 18, the training side).

Every bad input ends in exit status 2 with one line on stderr naming the file (and line), key or value, before
anything is written: a fresh ``output_dir`` is not even created. Covered: unreadable images (decided from their
headers before step 0, or skipped and counted with ``skip_bad_samples``), malformed JSONL and recipe files, an
unusable ``output_dir`` and a disk that fills up mid-run, hub errors, non-finite and out-of-range values, datasets
with nothing to train on, and checkpoints that do not fit. Fuzz tests (hypothesis) for the JSONL sample parser and
the recipe loader. Runs in-process (``train.main``); no test touches the network.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from conftest import time_limit, tmpfs
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from train_helpers import REPO, png_header, read_metrics, stderr_lines, train_main, write_dataset

from aria_jax.errors import InputError
from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training.config import RecipeError, TrainConfig, load_config

TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_bars(monkeypatch):
    """No progress bars on stderr, so that a failure mid-run leaves exactly its one line there."""
    import tqdm

    from aria_jax.training import trainer

    plain = tqdm.tqdm
    quiet = lambda *a, **k: plain(*a, **{**k, "disable": True})  # noqa: E731
    for module in (tqdm, trainer, J):
        monkeypatch.setattr(module, "tqdm", quiet)


@pytest.fixture(scope="module")
def processor(chat_dir):
    from aria_jax.inference.processor import AriaProcessor

    return AriaProcessor.from_pretrained(chat_dir[0])


def fails(capsys, args: list[str], *needles: str) -> str:
    """train.py with ``args`` exits 2 with exactly one line on stderr, ``error: ...`` containing every needle."""
    code = train_main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-3000:]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def jpeg_bytes(seed: int = 0) -> bytes:
    import io

    arr = np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int = 0) -> bytes:
    import io

    arr = np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "empty.png": b"",
    "not_an_image.png": b"this is text, not pixels\n",
    "truncated.png": png_bytes()[:400],
    "bomb.png": png_header(30000, 30000),  # 900 million pixels: over twice Pillow's limit
}


def image_line(name: str, text: str = "describe") -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a cat and a cup of coffee"}]}]
    return json.dumps({"messages": msgs, "images": [f"images/{name}"]})


def dataset(tmp_path, lines: list[str] = (), images: dict[str, bytes] | None = None, n: int = 3) -> str:
    """write_dataset's ``n`` samples, then ``lines`` (train.jsonl:n+1, ...) and the extra image files."""
    root = tmp_path / "ds"
    write_dataset(root, n=n)
    for name, payload in (images or {}).items():
        (root / "images" / name).write_bytes(payload)
    with open(root / "train.jsonl", "a") as f:
        f.writelines(line + "\n" for line in lines)
    return str(root)


def chat_args(chat_dir, data: str, out, *extra: str) -> list[str]:
    return [f"model_name_or_path={chat_dir[0]}", f"dataset_mixer={{{data}: 1}}", f"output_dir={out}",
            "max_image_size=490", "max_seq_length=256", "gradient_checkpointing=false", "export=false", *extra]


def tiny_args(out, *extra: str) -> list[str]:
    return ["--config", TINY, f"output_dir={out}", "export=false", *extra]


def snapshot(root) -> dict[str, bytes]:
    """Every file below ``root`` and its bytes (to show a dataset untouched)."""
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_unreadable_image_is_refused_before_step_0(tmp_path, capsys, chat_dir, name):
    data = dataset(tmp_path, [image_line(name)], {name: BAD_IMAGES[name]})
    before = snapshot(data)
    out = tmp_path / "out"
    line = fails(capsys, chat_args(chat_dir, data, out), "train.jsonl:4", name, "cannot read image",
                 "skip_bad_samples")
    if name == "bomb.png":
        assert "decompression bomb" in line
    assert not out.exists()  # decided before the run starts: nothing written
    assert snapshot(data) == before


def test_skip_bad_samples_leaves_them_out_counts_and_logs_them(tmp_path, capsys, chat_dir):
    """A bad header (empty file) is left out before step 0; a JPEG whose header is fine but whose pixels are cut
    short fails only when decoded, and is dropped then (one process): both counted, each said once."""
    jpeg = jpeg_bytes()
    data = dataset(tmp_path, [image_line("empty.png"), image_line("cut.jpg")],
                   {"empty.png": b"", "cut.jpg": jpeg[: len(jpeg) // 2]}, n=6)
    out = tmp_path / "out"
    code = train_main(chat_args(chat_dir, data, out, "skip_bad_samples=true", "per_device_train_batch_size=2",
                                "max_steps=4", "save_steps=100"))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    said = [line for line in captured.out.splitlines() if line.startswith("skip_bad_samples")]
    assert len(said) == 2, said
    assert said[0].startswith("skip_bad_samples: left out 1 of 8 samples") and "train.jsonl:7" in said[0]
    assert "empty.png" in said[0]
    assert "train.jsonl:8" in said[1] and "cut.jpg" in said[1] and "truncated" in said[1]
    metrics = read_metrics(out)
    assert [m["skipped_samples"] for m in metrics] == [1] * 4
    assert metrics[-1]["dropped_samples"] >= 1
    assert stderr_lines(captured.err) == []
    assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl", "tensorboard", "train_config.yaml"]


def test_image_failing_only_when_decoded_is_one_line_without_skip(tmp_path, capsys, chat_dir):
    jpeg = jpeg_bytes()
    data = dataset(tmp_path, [image_line("cut.jpg")], {"cut.jpg": jpeg[: len(jpeg) // 2]})
    out = tmp_path / "out"
    # a batch of all four samples: the bad one is decoded for the first step, before anything is written
    fails(capsys, chat_args(chat_dir, data, out, "per_device_train_batch_size=4", "max_steps=1"),
          "train.jsonl:4", "cut.jpg", "truncated", "skip_bad_samples")
    assert not out.exists()


def test_decode_failures_with_several_processes_are_refused_alike(tmp_path):
    record = J.Record([], ["/d/images/a.jpg"], "/d/train.jsonl:9")
    exc = D.ImageError("/d/images/a.jpg: cannot read image (image file is truncated)")
    said = []
    one = D.BadImages(skip=True, processes=1, log=said.append)
    one(3, record, exc)
    one(3, record, exc)  # the order reaches it again next epoch: dropped again, said once
    assert one.bad == {3} and len(said) == 1 and "train.jsonl:9" in said[0]
    with pytest.raises(RecipeError, match=r"train.jsonl:9: .*a.jpg.*multi-host run cannot drop"):
        D.BadImages(skip=True, processes=2)(3, record, exc)
    with pytest.raises(RecipeError, match=r"train.jsonl:9: .*a.jpg.*set skip_bad_samples: true"):
        D.BadImages(skip=False, processes=1)(3, record, exc)


def test_image_headers_are_read_once(tmp_path, monkeypatch, processor):
    """check_images reads every header once; measure (the multi-host batch plan) reuses those sizes."""
    import aria_jax.inference.image_processor as ip

    records = J.read_jsonl(dataset(tmp_path, n=6))
    calls = []
    real = ip.image_size
    for module in (J, D):  # the modules that read headers, each with its own binding of image_size
        monkeypatch.setattr(module, "image_size", lambda p: calls.append(p) or real(p))
    kept, skipped, sizes = J.check_images(records, skip_bad=False)
    assert kept == records and skipped == 0
    assert sorted(calls) == sorted(set(calls)) == sorted(sizes)
    encoder = D.JsonlEncoder(processor, 490, False, sizes)
    for record in records:
        encoder.measure(record)
    assert len(calls) == len(sizes)


# ---------------------------------------------------------------------------------------------------- item 7


MALFORMED_LINES = [
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"messages": ' + b"1" * 5000 + b"}", "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "content item"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "not valid Unicode"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["a\\u0000b.png"]}',
     "not a file name"),
    (b'{"messages": [{"role": "user", "content": "look <|img|> here"}, {"role": "assistant", "content": "ok"}]}',
     "image placeholder"),
]


@pytest.mark.parametrize("line, needle", MALFORMED_LINES, ids=[needle for _, needle in MALFORMED_LINES])
def test_malformed_jsonl_lines_are_one_line(tmp_path, capsys, chat_dir, line, needle):
    data = dataset(tmp_path)
    with open(os.path.join(data, "train.jsonl"), "ab") as f:
        f.write(line + b"\n")
    out = tmp_path / "out"
    fails(capsys, chat_args(chat_dir, data, out), "train.jsonl:4", needle)
    assert not out.exists()


BAD_RECIPES = {
    "binary": (b"\x00\xff\xfe garbage \x80", "not valid YAML"),
    "deep": (b"a: " + b"[" * 5000 + b"]" * 5000, "not valid YAML"),
    "a_list": (b"- just\n- a list\n", "expected a mapping of config keys"),
    "int_key": (b"1: 2\nlearning_rate: 1e-3\n", "config keys must be names"),
    "list_key": (b"[1, 2]: 3\n", "not valid YAML"),
    "huge_int": (b"max_steps: " + b"9" * 5000 + b"\n", "not valid YAML"),
    "self_reference": (b"model_config: &a {x: *a}\n", "'model_config'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECIPES))
def test_bad_recipe_files_are_one_line(tmp_path, capsys, kind):
    content, needle = BAD_RECIPES[kind]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    fails(capsys, ["--config", str(recipe), f"output_dir={tmp_path / 'out'}"], needle)
    assert not (tmp_path / "out").exists()


def test_recipe_that_is_a_directory(tmp_path, capsys):
    fails(capsys, ["--config", str(tmp_path)], str(tmp_path), "cannot read")


# ---------------------------------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("kind", ["file", "empty", "below_a_file"])
def test_unusable_output_dir_is_refused_before_anything_is_written(tmp_path, capsys, kind):
    (tmp_path / "a_file").write_text("keep me")
    out = {"file": tmp_path / "a_file", "empty": "", "below_a_file": tmp_path / "a_file" / "run"}[kind]
    line = fails(capsys, ["--config", TINY, f"output_dir='{out}'"], "config key 'output_dir'")
    assert {"file": "is not a directory", "empty": "non-empty path", "below_a_file": f"lies below {tmp_path / 'a_file'}"
            }[kind] in line
    assert sorted(os.listdir(tmp_path)) == ["a_file"] and (tmp_path / "a_file").read_text() == "keep me"


def test_read_only_output_dir(tmp_path, capsys, monkeypatch):
    mount = tmp_path / "ro"
    with tmpfs(mount, "ro,size=1m") as mounted:
        if not mounted:  # no permission to mount: a file system that refuses every new file
            import tempfile

            def refuse(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        fails(capsys, tiny_args(mount / "run"), "config key 'output_dir'", str(mount / "run"),
              "Read-only file system")
        assert not (mount / "run").exists()


def test_full_disk_mid_run_is_one_line_and_resume_trusts_only_complete_checkpoints(tmp_path, capsys, monkeypatch):
    """A 1 MB file system holds one checkpoint of the tiny model, not two: the second save fails (ENOSPC), the run
    ends with one line, nothing half-written is trusted, and with room again the run resumes from step 2."""
    disk = tmp_path / "disk"
    out = disk / "run"
    args = tiny_args(out, "max_steps=6", "save_steps=2", "save_total_limit=null")
    with tmpfs(disk, "size=1m") as mounted:
        if not mounted:  # no permission to mount: Orbax's save of step 4 fails as TensorStore reports ENOSPC
            import orbax.checkpoint as ocp

            real_save = ocp.CheckpointManager.save

            def full(self, step, *a, **k):
                if step >= 4:
                    raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in {self.directory}: Failed to write: "
                                     "No space left on device [os_error_code='28']")
                return real_save(self, step, *a, **k)

            monkeypatch.setattr(ocp.CheckpointManager, "save", full)
        fails(capsys, args, str(out), "No space left on device")  # a checkpoint, or metrics.jsonl
        steps = sorted(p for p in os.listdir(out / "checkpoints") if p.isdigit())
        assert steps == ["2"]  # the failed save left at most a temporary directory
        records = read_metrics(out)  # every line whole
        assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= 4
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        else:
            monkeypatch.undo()
        assert train_main([*args, "resume_from_checkpoint=true"]) == 0
        captured = capsys.readouterr()
        assert "resumed from step 2" in captured.out, captured.err[-3000:]
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
        assert sorted(p for p in os.listdir(out / "checkpoints") if p.isdigit()) == ["2", "4", "6"]


def test_a_full_disk_reported_by_the_checkpoint_is_not_hidden_by_the_events_file(tmp_path, capsys, monkeypatch):
    """The save of step 4 fails on a full disk, and so does every TensorBoard flush after it (an OSError naming no
    file, as tensorboardX reports it): the one line names the checkpoints directory that failed first."""
    import orbax.checkpoint as ocp
    from tensorboardX.event_file_writer import EventsWriter

    out = tmp_path / "run"
    full = []
    real_save, real_flush = ocp.CheckpointManager.save, EventsWriter.flush

    def save(self, step, *a, **k):
        if step >= 4:
            full.append(step)
            raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in {self.directory}: Failed to write: "
                             "No space left on device [os_error_code='28']")
        return real_save(self, step, *a, **k)

    def flush(self):
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_flush(self)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(EventsWriter, "flush", flush)
    fails(capsys, tiny_args(out, "max_steps=6", "save_steps=2", "save_total_limit=null"),
          str(out / "checkpoints"), "No space left on device")


@pytest.mark.slow
def test_full_disk_in_a_real_process_prints_one_line(tmp_path):
    """As above, in a process of its own: what Orbax's background writes report as they fail (absl errors, and
    "Exception ignored" tracebacks up to the interpreter's exit) stays off stderr."""
    from train_helpers import run_train

    disk = tmp_path / "disk"
    with tmpfs(disk, "size=1m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here")
        result = run_train(tiny_args(disk / "run", "max_steps=6", "save_steps=2"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0], lines


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The export is staged beside output_dir/export and moved in whole: a full disk leaves no partial export."""
    import types

    from flax import traverse_util

    from aria_jax.config import AriaConfig
    from aria_jax.inference.api import Aria
    from aria_jax.training import export
    from aria_jax.training.trainer import export_final

    disk = tmp_path / "disk"
    with tmpfs(disk, "size=64k") as mounted:
        if not mounted:  # no permission to mount: safetensors fails as it does on a full disk
            def full(tensors, path, metadata=None):
                raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

            monkeypatch.setattr(export, "save_file", full)
        cfg = load_config(TINY, [f"output_dir={disk}"])
        config = AriaConfig.from_dict(cfg.model_config)
        flat = traverse_util.flatten_dict(Aria.from_config(config, seed=0, dtype="float32", layout="stacked").params)
        trained = {p: v for p, v in flat.items() if p[0] != "vision_tower"}
        setup = types.SimpleNamespace(cfg=cfg, mesh=None, layerwise=False, rules=[], config=config, base_dir=None,
                                      frozen=traverse_util.unflatten_dict({p: v for p, v in flat.items()
                                                                           if p not in trained}))
        with pytest.raises(InputError) as info:
            export_final(setup, {"trainable": traverse_util.unflatten_dict(trained)})
        assert str(info.value) == f"{disk / 'export'}: cannot write (No space left on device)"
        assert os.listdir(disk) == []


def test_metrics_write_failure_leaves_no_partial_line(tmp_path, monkeypatch):
    from aria_jax.training.metrics_log import MetricsLog

    log = MetricsLog(str(tmp_path), None)
    log.write({"step": 1, "lm_loss": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        log.write({"step": 2, "lm_loss": 0.5})
    assert info.value.filename == str(tmp_path / "metrics.jsonl") and info.value.errno == errno.ENOSPC
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    monkeypatch.undo()
    log.close()
    # A line cut short anyway (a crash mid-write) is dropped on resume, not trusted, and not a crash.
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "lm_lo')
    MetricsLog(str(tmp_path), 5).close()
    assert read_metrics(tmp_path) == [{"step": 1, "lm_loss": 1.0}]


# ---------------------------------------------------------------------------------------------------- item 9


def _hub_error(kind: str) -> Exception:
    import httpx2
    from huggingface_hub import errors

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/missing-model")
    if kind == "offline":
        return errors.LocalEntryNotFoundError("cannot find the requested files in the disk cache")
    cls, status = {"missing": (errors.RepositoryNotFoundError, 404), "gated": (errors.GatedRepoError, 403)}[kind]
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("key", ["model_name_or_path", "tokenizer_path"])
@pytest.mark.parametrize("kind, needle", [("missing", "no such repository"), ("gated", "gated"),
                                          ("offline", "not in the local cache")])
def test_hub_errors_name_the_key_and_the_model_id(tmp_path, capsys, monkeypatch, chat_dir, key, kind, needle):
    import huggingface_hub

    def download(repo_id, **kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    args = chat_args(chat_dir, dataset(tmp_path), tmp_path / "out", f"{key}=org/missing-model")  # the last wins
    fails(capsys, args, f"config key '{key}'", "org/missing-model", needle)
    assert not (tmp_path / "out").exists()


def test_hub_ids_are_downloaded(tmp_path, monkeypatch, chat_dir):
    import huggingface_hub

    from aria_jax.training.trainer import load_model

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **k: asked.append(repo_id) or chat_dir[0])
    cfg = load_config(None, ["model_name_or_path=org/aria-tiny", f"dataset_mixer={{{dataset(tmp_path)}: 1}}",
                             "tokenizer_path=org/aria-tokenizer"])
    config, params, processor, base_dir = load_model(cfg)
    assert asked == ["org/aria-tiny", "org/aria-tokenizer"] and base_dir == chat_dir[0] and processor is not None


# ---------------------------------------------------------------------------------------------------- item 11

FLOAT_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_keys_refuse_nan_and_infinity(key):
    assert {"learning_rate", "num_train_epochs", "weight_decay", "warmup_ratio", "moe_aux_loss_coeff",
            "moe_z_loss_coeff", "lora_alpha", "adam_epsilon"} <= set(FLOAT_KEYS)
    for value, shown in [("nan", "nan"), (".nan", "nan"), ("inf", "inf"), (".inf", "inf"), ("-.inf", "-inf"),
                         ("1e999", "inf"), ("-Infinity", "-inf"), ("1" + "0" * 400, "inf")]:
        with pytest.raises(RecipeError) as info:
            load_config(TINY, [f"{key}={value}"])
        assert str(info.value) == f"config key '{key}': must be a finite number (got {shown})", value


OUT_OF_RANGE = [
    ("synthetic_samples=0", "config key 'synthetic_samples': must be >= 1 (got 0)"),
    ("weight_decay=-0.1", "config key 'weight_decay': must be >= 0 (got -0.1)"),
    ("moe_aux_loss_coeff=-1", "config key 'moe_aux_loss_coeff': must be >= 0 (got -1.0)"),
    ("moe_z_loss_coeff=-1e-5", "config key 'moe_z_loss_coeff': must be >= 0 (got -1e-05)"),
    ("learning_rate=-1e-3", "config key 'learning_rate': must be >= 0 (got -0.001)"),
    ("adam_epsilon=0", "config key 'adam_epsilon': must be > 0 (got 0.0)"),
    ("lora_alpha=0", "config key 'lora_alpha': must be > 0 (got 0.0)"),
    ("adam_beta1=1", "config key 'adam_beta1': must be in [0, 1) (got 1.0)"),
    ("adam_beta2=1", "config key 'adam_beta2': must be in (0, 1) (got 1.0)"),
    ("max_grad_norm=-1", "config key 'max_grad_norm': must be >= 0 (0: no clipping) (got -1.0)"),
    ("warmup_ratio=1.5", "config key 'warmup_ratio': must be in [0, 1] (got 1.5)"),
    ("seed=-1", "config key 'seed': must be in [0, 2**32) (got -1)"),
    ("max_steps=" + "9" * 30, "config key 'max_steps': 999999999999999999999999999999 is too large"),
    ("freeze_llm_layers=[true]", "config key 'freeze_llm_layers': expected a list of integers, got True in it"),
    ("resume_from_checkpoint=3", "config key 'resume_from_checkpoint': expected true, false or a checkpoint path, "
                                 "got 3"),
    ("model_config={a: &x [*x]}", "config key 'model_config': too large or too deeply nested (or it refers to "
                                  "itself)"),
    ("model_config={a: 2020-01-01}", "config key 'model_config': datetime.date(2020, 1, 1) is not a plain value"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o.split("=")[0] + str(i) for i, (o, _) in
                                                                 enumerate(OUT_OF_RANGE)])
def test_out_of_range_values(override, message):
    with pytest.raises(RecipeError) as info:
        load_config(TINY, [override])
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("weight, shown", [(".nan", "nan"), (".inf", "inf"), ("-1", "-1"), ("true", "True")])
def test_dataset_mixer_weights_are_finite_and_positive(tmp_path, weight, shown):
    data = dataset(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_config(TINY, [f"dataset_mixer={{{data}: {weight}}}"])
    assert str(info.value) == (f"config key 'dataset_mixer': weight for '{data}' must be a finite positive number "
                               f"(got {shown})")


def test_nan_learning_rate_through_train_py(tmp_path, capsys):
    line = fails(capsys, tiny_args(tmp_path / "out", "learning_rate=nan"))
    assert line == "error: config key 'learning_rate': must be a finite number (got nan)"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- item 12


def test_dataset_with_nothing_to_train_on_is_refused(tmp_path, capsys, chat_dir):
    """max_seq_length 13 cuts through the two-image samples' images and leaves the others no assistant token."""
    out = tmp_path / "out"
    fails(capsys, chat_args(chat_dir, dataset(tmp_path), out, "max_seq_length=13"), "every sample is dropped",
          "cuts through the images", "no assistant token")
    assert not out.exists()


def test_samples_without_a_trained_token_are_dropped_in_measure_and_encode_alike(tmp_path, processor):
    records = J.read_jsonl(dataset(tmp_path))
    encoder = D.JsonlEncoder(processor, 490, False)
    first_label = int(np.nonzero(encoder(records[1]).labels != -100)[0][0])  # the text-only sample
    for max_len in (first_label, first_label + 1, first_label + 2):
        source, measure = D.build_source(records, encoder, max_len), D.build_measure(records, encoder, max_len)
        sample = source(1)
        assert (sample is None) == (max_len == first_label)
        assert measure(1) == (None if sample is None else D.meta_of(sample))
        if sample is not None:
            assert measure(1).labels == max_len - first_label


def test_label_tokens_metric_is_the_true_count():
    """The metric counts the label tokens really trained on (0 for a batch without any; today it reported 1, the
    loss denominator's floor). The model is stubbed: the count is train_step's own."""
    import types

    import jax
    import jax.numpy as jnp

    from aria_jax.training import trainer

    def grad_fn(spare, trainable, frozen, batch, rng, denom):
        return (jnp.float32(0.0), {"ce_sum": 0.0, "label_tokens": 0, "z_loss": 0.0, "aux_loss": 0.0}), spare

    fns = (grad_fn, lambda state, grads: (state, 0.0, 0.0), lambda a, b: a)
    setup = types.SimpleNamespace(spare_grads=[], cfg=TrainConfig(model_config={}), frozen={})
    state = {"trainable": {"w": jnp.zeros(3)}}
    labels = np.array([[-100, 5, 6, -100], [-100, -100, 7, -100]], np.int32)
    batch = {"input_ids": np.zeros((2, 4), np.int32), "labels": labels}
    _, metrics = trainer.train_step(setup, fns, state, [batch, batch], jax.random.key(0))
    assert metrics["label_tokens"] == 6
    empty = {**batch, "labels": np.full_like(labels, -100)}
    _, metrics = trainer.train_step(setup, fns, state, [empty], jax.random.key(0))
    assert metrics["label_tokens"] == 0 and metrics["lm_loss"] == 0.0


# ---------------------------------------------------------------------------------------------------- item 13


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny run with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert train_main(tiny_args(out, "max_steps=2", "save_steps=2")) == 0
    return out


def _recipe_with(tmp_path, **text_config) -> str:
    with open(TINY) as f:
        recipe = yaml.safe_load(f)
    recipe["model_config"]["text_config"].update(text_config)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("change, needle", [
    ({"num_hidden_layers": 3}, "has shape (2, 32) in the checkpoint but (3, 32) in this model"),
    ({"vocab_size": 96}, "parameter language_model/embed_tokens has shape (64, 32) in the checkpoint but (96, 32)"),
])
def test_resume_with_another_model_shape_names_the_parameter(tmp_path, capsys, saved_run, change, needle):
    before = snapshot(saved_run)
    out = tmp_path / "out"
    fails(capsys, ["--config", _recipe_with(tmp_path, **change), f"output_dir={out}", "export=false",
                   f"resume_from_checkpoint={saved_run / 'checkpoints' / '2'}"],
          "config key 'resume_from_checkpoint'", str(saved_run / "checkpoints" / "2"), needle)
    assert not out.exists() and snapshot(saved_run) == before


def test_resume_with_other_trained_parameters_names_one(tmp_path, capsys, saved_run):
    fails(capsys, tiny_args(tmp_path / "out", "use_peft=true", f"resume_from_checkpoint={saved_run}"),
          "config key 'resume_from_checkpoint'", "has no parameter language_model/")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["nope", "nope/checkpoints/4"])
def test_resume_from_a_missing_path_is_refused_and_not_created(tmp_path, capsys, where):
    fails(capsys, tiny_args(tmp_path / "out", f"resume_from_checkpoint={tmp_path / where}"),
          "config key 'resume_from_checkpoint'", str(tmp_path / where), "no such directory")
    assert sorted(os.listdir(tmp_path)) == []


def test_resume_from_a_step_directory_that_is_no_checkpoint(tmp_path, capsys, saved_run):
    (saved_run / "checkpoints" / "7").mkdir()  # a directory named like a step, which Orbax never wrote
    try:
        fails(capsys, tiny_args(tmp_path / "out", f"resume_from_checkpoint={saved_run / 'checkpoints' / '7'}"),
              "config key 'resume_from_checkpoint'", str(saved_run / "checkpoints" / "7"), "cannot read")
    finally:
        (saved_run / "checkpoints" / "7").rmdir()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- item 14


@pytest.mark.parametrize("extra, needle", [
    (["freeze_llm=true", "freeze_projector=true"], "nothing to train"),
    (["mesh=data=3"], "config key 'mesh'"),
])
def test_failed_setup_leaves_no_output_dir(tmp_path, capsys, extra, needle):
    fails(capsys, tiny_args(tmp_path / "out", *extra), needle)
    assert not (tmp_path / "out").exists()


def test_missing_model_leaves_no_output_dir(tmp_path, capsys, chat_dir):
    out = tmp_path / "out"
    fails(capsys, chat_args(chat_dir, dataset(tmp_path), out, f"model_name_or_path={tmp_path / 'no_model'}"),
          "config key 'model_name_or_path'", str(tmp_path / "no_model"))
    assert not out.exists()


def test_resolved_config_is_written_whole_once_the_run_starts(saved_run):
    written = yaml.safe_load((saved_run / "train_config.yaml").read_text())
    assert written["max_steps"] == 2 and written["output_dir"] == str(saved_run)
    assert sorted(os.listdir(saved_run)) == ["checkpoints", "metrics.jsonl", "tensorboard", "train_config.yaml"]


# ---------------------------------------------------------------------------------------------------- fuzz


VALID_LINES = [
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}],
     "images": ["images/img0.png"]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
]


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("fuzz"), n=3)


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, insert or delete bytes: (kind, position, byte) each."""
    out = bytearray(data)
    for kind, position, byte in edits:
        i = position % (len(out) + 1)
        if kind == 0 and i < len(out):
            out[i] ^= 1 << (byte % 8)
        elif kind == 1:
            out[i:i] = bytes([byte])
        elif i < len(out):
            del out[i]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=20)


def parses_or_refuses(parse, *args):
    """``parse(*args)`` returns, or raises one of the project's one-line errors; never hangs."""
    with time_limit(10):
        try:
            return parse(*args)
        except InputError as exc:
            assert isinstance(exc, RecipeError), type(exc)
            assert "\n" not in str(exc).strip(), str(exc)
            return None


@given(st.binary(max_size=300))
def test_fuzz_jsonl_line_random_bytes(fuzz_root, raw):
    parses_or_refuses(J.parse_line, raw, fuzz_root, "train.jsonl:1")


@given(st.sampled_from([json.dumps(line).encode() for line in VALID_LINES]), EDITS)
def test_fuzz_jsonl_line_mutated(fuzz_root, line, edits):
    parses_or_refuses(J.parse_line, mutate(line, edits), fuzz_root, "train.jsonl:1")


@given(st.sampled_from(VALID_LINES), st.sampled_from(["messages", "images", "role", "content", "type", "text"]),
       JSON, st.integers(0, 3))
def test_fuzz_jsonl_line_wrong_types(fuzz_root, line, key, value, depth):
    """A value of any JSON type, or a very deep one, in place of each field."""
    line = json.loads(json.dumps(line))
    for _ in range(depth):
        value = [value] * 2
    if key in ("messages", "images"):
        line[key] = value
    else:
        message = line["messages"][0]
        target = message if key in ("role", "content") else (
            message["content"][0] if isinstance(message["content"], list) else message)
        target[key] = value
    parses_or_refuses(J.parse_line, json.dumps(line), fuzz_root, "train.jsonl:1")


@given(st.lists(st.binary(max_size=80) | st.sampled_from([json.dumps(v).encode() for v in VALID_LINES]),
                max_size=5))
def test_fuzz_read_jsonl(tmp_path, fuzz_root, lines):
    root = tmp_path / "jsonl"
    root.mkdir(exist_ok=True)
    if not (root / "images").exists():
        shutil.copytree(os.path.join(fuzz_root, "images"), root / "images")
    (root / "train.jsonl").write_bytes(b"\n".join(lines))
    parses_or_refuses(J.read_jsonl, str(root))


@given(st.binary(max_size=300))
def test_fuzz_recipe_random_bytes(tmp_path, raw):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(raw)
    parses_or_refuses(load_config, str(recipe), [f"output_dir={tmp_path / 'out'}"])


@given(EDITS)
def test_fuzz_recipe_mutated(tmp_path, edits):
    with open(TINY, "rb") as f:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_bytes(mutate(f.read(), edits))
    parses_or_refuses(load_config, str(recipe), [])


FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
YAML_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["nan", ".nan", "inf", "-.inf", "1e999", "9" * 5000, "[" * 3000, "{a: &a [*a]}", "&a [*a, *a]",
                     "!!python/object:os.system", "2020-01-01", "!!binary aGk=", "!!set {a, b}", "~", "''", "-1",
                     "0", "1e-3", "true", "[1, 2.5, x]", "{1: 2}", "? [a]\n: b"]),
    JSON.map(json.dumps),
)


@given(st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=10), YAML_VALUES), max_size=4))
def test_fuzz_recipe_overrides(overrides):
    parses_or_refuses(load_config, TINY, [f"{key}={value}" for key, value in overrides])
