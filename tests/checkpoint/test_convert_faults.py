"""convert / export / load as a careless or hostile user would run them: the source is never touched, bad data never
passes silently, every failure is one line with status 2 and nothing half-written (issue 18, items 1-3, 7, 8, 14)."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tmpfs
from safetensors.torch import load_file, save_file

from aria_jax import Aria, AriaConfig
from aria_jax.checkpoint.converted import is_converted
from aria_jax.checkpoint.safetensors_io import CheckpointError
from aria_jax.cli import main
from aria_jax.files import staging_path

NAME = "gqa"


def snapshot(root) -> dict[str, str]:
    """Every file below ``root`` (links not followed) with the sha256 of its bytes."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            out[key] = "link:" + os.readlink(path) if os.path.islink(path) else hashlib.sha256(
                open(path, "rb").read()).hexdigest()
    return out


def run_cli(args, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def error_line(err: list[str], command: str) -> str:
    assert len(err) == 1 and err[0].startswith(f"aria-jax {command}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def converted_once(checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "model"
    assert main(["convert", checkpoint(NAME, "hub"), str(dst), "--quiet"]) == 0
    return dst


@pytest.fixture
def sources(checkpoint, converted_once, tmp_path):
    """A private copy of an HF checkpoint and of a converted directory, under tmp_path/work."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(checkpoint(NAME, "hub"), work / "hf")
    shutil.copytree(converted_once, work / "conv")
    return {"convert": work / "hf", "export": work / "conv"}


# ---- 1. the output may never be, contain or lie inside the source (nor contain the working directory) ----------

OVERLAPS = {
    "dst_is_src": (lambda s: s, "is the source"),
    "dst_is_parent": (lambda s: s.parent, "contains the source"),
    "dst_is_dot_with_src_inside": (lambda s: ".", "contains the source"),
    "dst_inside_src": (lambda s: s / "out", "lies inside the source"),
    "dst_links_to_src": (lambda s: _link(s.parent.parent / "link", s), "is the source"),
    "dst_relative_path_to_src": (lambda s: os.path.relpath(s / ".." / s.name), "is the source"),
}


def _link(link, target):
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("case", sorted(OVERLAPS))
@pytest.mark.parametrize("command", ["convert", "export"])
def test_overwrite_never_touches_the_source(command, case, sources, tmp_path, monkeypatch, capsys):
    src = sources[command]
    monkeypatch.chdir(src.parent)  # the working directory holds the source, as in `convert model . --overwrite`
    make, reason = OVERLAPS[case]
    dst = make(src)
    before = snapshot(tmp_path)
    code, err = run_cli([command, src, dst, "--overwrite", "--quiet"], capsys)
    assert code == 2
    assert reason in error_line(err, command)
    assert snapshot(tmp_path) == before  # the source, the working directory and everything else as they were


def test_the_working_directory_is_never_the_output(sources, tmp_path, monkeypatch, capsys):
    here = tmp_path / "project"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    code, err = run_cli(["convert", sources["convert"], ".", "--overwrite", "--quiet"], capsys)
    assert code == 2 and "contains the working directory" in error_line(err, "convert")
    assert snapshot(tmp_path) == before


# ---- 2. NaN and infinity: refused unless --allow-nonfinite, and never "within tolerance" --------------------------

EMBED = "model.language_model.embed_tokens.weight"  # copied file to file in the transformers5 layout
Q0 = "model.language_model.layers.0.self_attn.q_proj.weight"  # transformed on the host


@pytest.fixture
def nonfinite_src(checkpoint, tmp_path):
    src = tmp_path / "nan"
    shutil.copytree(checkpoint(NAME, "transformers5"), src)
    state = load_file(src / "model.safetensors")
    state[EMBED][3, :2] = float("nan")
    state[Q0][:] = float("inf")
    save_file(state, src / "model.safetensors")
    return src


def test_nonfinite_tensors_are_refused_by_name(nonfinite_src, tmp_path, capsys):
    dst = tmp_path / "out"
    code, err = run_cli(["convert", nonfinite_src, dst, "--quiet"], capsys)
    assert code == 2
    line = error_line(err, "convert")
    assert re.search(r"model\.safetensors: tensor '(.*)' has [\d,]+ NaN or infinite value\(s\); pass --allow-nonfinite",
                     line), line
    assert EMBED in line or Q0 in line
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_allow_nonfinite_converts_with_one_warning_per_tensor(nonfinite_src, tmp_path, capsys):
    dst = tmp_path / "out"
    code, err = run_cli(["convert", nonfinite_src, dst, "--quiet", "--allow-nonfinite"], capsys)
    assert code == 0 and is_converted(dst)
    warnings = [x for x in err if x.startswith("aria-jax convert: warning:")]
    assert len(warnings) == 2
    assert f"tensor '{EMBED}' has 2 NaN or infinite value(s)" in warnings[0] + warnings[1]
    assert f"tensor '{Q0}' has 4,096 NaN or infinite value(s)" in warnings[0] + warnings[1]


def test_verify_fails_on_nonfinite_logits(nonfinite_src, tmp_path, capsys):
    """Before: "verify: max relative error nan, KL nan (within tolerance)" and status 0."""
    dst = tmp_path / "out"
    code, err = run_cli(["convert", nonfinite_src, dst, "--quiet", "--allow-nonfinite", "--verify"], capsys)
    assert code == 1
    assert err[-1].startswith("aria-jax convert: verify failed: non-finite logits ("), err
    assert not dst.exists()


def test_verify_fails_when_the_measure_itself_is_nan(monkeypatch):
    from aria_jax.cli import verify

    monkeypatch.setattr(verify, "compare", lambda out, ref: {"max_rel_err": float("nan"), "kl": float("nan")})
    monkeypatch.setattr(verify, "reference_logits", lambda *a: np.zeros((1, 2, 3), np.float32))
    monkeypatch.setattr("aria_jax.inference.api.Aria.from_pretrained",
                        classmethod(lambda cls, *a, **k: type("M", (), {"forward": lambda self, **b: np.zeros(3)})()))
    cfg = AriaConfig.preset("tiny")
    for dtype in (np.dtype(np.float32), np.dtype("bfloat16")):
        with pytest.raises(verify.VerifyError):
            verify.verify_conversion({}, "hub", cfg, "unused", dtype)


# ---- 3 and 7. a damaged converted directory: every chunk checked, one line naming the file or parameter ---------

GATE_UP = "language_model.layers.mlp.gate_up"
DAMAGE = {
    "chunk_missing": (lambda d: (d / "params" / GATE_UP / "1.2.0.0").unlink(),
                      rf"parameter '{GATE_UP}': chunk file 1.2.0.0 is missing"),
    "chunk_truncated": (lambda d: os.truncate(d / "params" / GATE_UP / "0.1.0.0", 100),
                        rf"parameter '{GATE_UP}': chunk file 0.1.0.0 has 100 bytes, expected 16384"),
    "metadata_garbage": (lambda d: (d / "params" / "_METADATA").write_text("garbage{"),
                         r"params/_METADATA: not valid JSON"),
    "metadata_not_a_tree": (lambda d: (d / "params" / "_METADATA").write_text('{"tree_metadata": 5}'),
                            r"params/_METADATA: not an Orbax checkpoint's metadata"),
    "zarray_garbage": (lambda d: (d / "params" / GATE_UP / ".zarray").write_bytes(b"\xff\x00"),
                       rf"{GATE_UP}/\.zarray: not valid JSON"),
    "zarray_bad_shape": (lambda d: _edit_json(d / "params" / GATE_UP / ".zarray", shape=[2, 4, 64, "x"]),
                         rf"{GATE_UP}/\.zarray: not a zarr v2 array description"),
    "zarray_other_shape": (lambda d: _edit_json(d / "params" / GATE_UP / ".zarray", shape=[2, 4, 64, 32]),
                           rf"parameter '{GATE_UP}' has shape \[2, 4, 64, 32\], config.json implies"),
}


def _edit_json(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("command, damage", [(c, d) for c in ("export", "generate", "inspect") for d in sorted(DAMAGE)
                                             if (c, d) != ("inspect", "zarray_other_shape")])  # inspect shows shapes
def test_damaged_converted_directory_is_one_line(command, damage, converted_once, tmp_path, capsys):
    """Before: export wrote zeros for a missing chunk and exited 0; loading raised AttributeError or tensorstore
    errors."""
    src = tmp_path / "conv"
    shutil.copytree(converted_once, src)
    make, expected = DAMAGE[damage]
    make(src)
    dst = tmp_path / "out"
    args = {"export": ["export", src, dst, "--quiet"], "inspect": ["inspect", src],
            "generate": ["generate", "--model", src, "--prompt", "hi"]}[command]
    before = snapshot(src)
    code, err = run_cli(args, capsys)
    assert code == 2
    assert re.search(expected, error_line(err, command)), err
    assert not dst.exists() and snapshot(src) == before


def test_damaged_converted_directory_fails_to_load_from_python(converted_once, tmp_path):
    src = tmp_path / "conv"
    shutil.copytree(converted_once, src)
    (src / "params" / GATE_UP / "1.0.0.0").unlink()
    with pytest.raises(CheckpointError, match="chunk file 1.0.0.0 is missing"):
        Aria.from_pretrained(src)


# ---- 7. malformed HF files -----------------------------------------------------------------------------------

def _deep_config(d):
    (d / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    return rf"{d / 'config.json'}: not valid JSON \(nested too deeply\)"


def _deep_header(d):
    header = b"[" * 50_000 + b"]" * 50_000
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return rf"{d / 'model.safetensors'}: corrupt safetensors header \(JSON nested too deeply\)"


def _huge_offsets(d):
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    text = json.dumps(header).replace(json.dumps(header[key]["data_offsets"]), "[0, 1e999]", 1).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return rf"{path}: corrupt header entry for tensor '{re.escape(key)}'"


def _bad_index(d):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    return r"model.safetensors.index.json: tensor 'x' maps to '../../etc/passwd', not a file in this directory"


@pytest.mark.parametrize("make", [_deep_config, _deep_header, _huge_offsets, _bad_index], ids=lambda f: f.__name__)
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_malformed_hf_files_are_one_line(command, make, checkpoint, tmp_path, capsys):
    """Before: RecursionError and OverflowError tracebacks."""
    src = tmp_path / "src"
    shutil.copytree(checkpoint(NAME, "hub"), src)
    expected = make(src)
    args = ["convert", src, tmp_path / "out", "--quiet"] if command == "convert" else ["inspect", src]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert re.search(expected, error_line(err, command)), err
    assert not (tmp_path / "out").exists()


# ---- 8. a read-only or full destination ------------------------------------------------------------------------

@contextlib.contextmanager
def failing_fs(root, monkeypatch, code: int, strerror: str, mkdir_fails: bool):
    """Without mount: creating directories (read-only) or writing files (full) under ``root`` fails with ``code``."""
    import builtins

    root = str(root)
    real_open, real_mkdir = builtins.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(root) and any(c in mode for c in "wax+"):
            raise OSError(code, strerror)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if mkdir_fails and str(path).startswith(root):
            raise OSError(code, strerror, str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    yield root


FILESYSTEMS = {"read_only": ("ro,size=1m", 30, "Read-only file system"),
               "full": ("size=128k", 28, "No space left on device")}


@pytest.mark.parametrize("fs", sorted(FILESYSTEMS))
@pytest.mark.parametrize("command", ["convert", "export"])
def test_read_only_or_full_destination_is_one_line_and_leaves_nothing(command, fs, sources, tmp_path, monkeypatch,
                                                                       capsys):
    options, code, strerror = FILESYSTEMS[fs]
    with tmpfs(tmp_path / "mnt", options) as mounted:
        fake = contextlib.nullcontext() if mounted else failing_fs(tmp_path / "mnt", monkeypatch, code, strerror,
                                                                   fs == "read_only")
        with fake:
            dst = tmp_path / "mnt" / "out"
            status, err = run_cli([command, sources[command], dst, "--quiet"], capsys)
            monkeypatch.undo()
            assert status == 2
            line = error_line(err, command)
            assert line.startswith(f"aria-jax {command}: error: {dst}: cannot ") and strerror in line, line
            assert os.listdir(tmp_path / "mnt") == []


def test_plan_json_path_is_checked_before_compiling(tmp_path, monkeypatch, capsys):
    import aria_jax.cli.plan

    monkeypatch.setattr(aria_jax.cli.plan, "run_plan", lambda args: pytest.fail("compiled before checking --json"))
    for target, why in [(tmp_path / "missing" / "plan.json", "does not exist"), (tmp_path, "is a directory")]:
        code, err = run_cli(["plan", "--model", "tiny", "--mesh", "expert=1", "--json", target], capsys)
        assert code == 2 and why in error_line(err, "plan")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        if mounted is None:
            pytest.skip("mount is not permitted here")
        code, err = run_cli(["plan", "--model", "tiny", "--mesh", "expert=1", "--json", mounted / "p.json"], capsys)
        assert code == 2 and "Read-only file system" in error_line(err, "plan")


# ---- 14. leftovers of killed runs, and --overwrite over a symlink ------------------------------------------------

def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_killed_runs_staging_directory_is_cleaned_by_the_next(command, sources, tmp_path, capsys):
    dst = tmp_path / "out"
    stale = staging_path(str(dst), "partial").replace(f"-{os.getpid()}", f"-{_dead_pid()}")
    os.makedirs(os.path.join(stale, "params"))
    code, err = run_cli([command, sources[command], dst, "--quiet"], capsys)
    assert code == 0, err
    assert any("removed .out.partial-" in line for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_overwrite_over_a_symlink_leaves_no_old_directory(command, sources, tmp_path, capsys):
    """Before: `.out.old-PID` stayed behind (rmtree refuses a symlink, and its error was ignored)."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    dst = _link(tmp_path / "out", target)
    code, err = run_cli([command, sources[command], dst, "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert not dst.is_symlink() and dst.is_dir()
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target", "work"]


# ---- SIGKILL at random points: the source intact, no DST (or a complete one), and a clean rerun ------------------

@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~40 MB, so that writing takes long enough to be killed in the middle."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    cfg = AriaConfig(
        text_config=dict(model_type="aria_text", vocab_size=8192, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8,
                         moe_topk=2, moe_num_shared_experts=1),
        vision_config=dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, image_size=56, patch_size=14),
        projector_patch_to_query_dict={16: 4, 4: 2}, image_token_index=9,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("big") / "hf"
    AriaForConditionalGeneration(cfg).save_pretrained(directory)
    converted = directory.parent / "conv"
    assert main(["convert", str(directory), str(converted), "--quiet"]) == 0
    return {"convert": directory, "export": converted}


def _kill_somewhere(args, parent, name, seed) -> None:
    """Start the CLI, wait for its staging directory, SIGKILL it after a random delay (or at once when done)."""
    import random
    import time

    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-m", "aria_jax.cli", *map(str, args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    if seed % 4:  # three in four kills land while writing; the others during start-up
        while process.poll() is None and time.monotonic() < deadline:
            if any(n.startswith(f".{name}.partial-") for n in os.listdir(parent)):
                break
            time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.4 if seed % 4 else 1.5))
    process.kill()
    process.wait()


def _complete(command: str, dst) -> bool:
    """Whether ``dst`` is a whole output: every parameter and chunk (convert), every shard and tensor (export)."""
    from aria_jax.checkpoint.converted import check_stored
    from aria_jax.checkpoint.safetensors_io import open_checkpoint
    from aria_jax.model.schema import declared_params, tensor_specs

    cfg = AriaConfig.from_pretrained(dst)
    if command == "convert":
        check_stored(dst, declared_params(cfg, np.float32)[0])
    else:
        assert len(open_checkpoint(dst)) == len(tensor_specs(cfg)) + 2
    return True


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("command", ["convert", "export"])
def test_sigkill_at_random_points_loses_nothing(command, seed, big_checkpoint, tmp_path, capsys):
    src = big_checkpoint[command]
    before = snapshot(src)
    dst = tmp_path / "out"
    _kill_somewhere([command, src, dst, "--quiet"], tmp_path, "out", seed)
    assert snapshot(src) == before
    # killed before its final rename: no DST, at most a staging directory that the next run removes; after it: whole
    if dst.exists():
        assert _complete(command, dst)
        shutil.rmtree(dst)
    code, err = run_cli([command, src, dst, "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert snapshot(src) == before and _complete(command, dst)
