"""``aria-jax plan``: analytic bytes from shapes and shardings, compiled numbers, fit verdict and exit status.

The plans run the tiny preset in subprocesses (each asks for its own virtual CPU devices), so this process's JAX
backend is left as it is.
"""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import traced_params
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from aria_jax import AriaConfig
from aria_jax.cli import main
from aria_jax.cli.plan import PlanError
from aria_jax.files import parse_size
from aria_jax.parallel.sharding import partition_spec

TINY = ["--model", "tiny", "--seq", "16", "--max-new-tokens", "4"]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aria_jax.cli", "plan", *args], capture_output=True, text=True)


def independent_param_bytes(mesh_shape: dict[str, int], dtype) -> tuple[int, int]:
    """(all params, routed experts) bytes per device: each array's shard shape on the mesh, summed."""
    shapes, logical = traced_params(AriaConfig.preset("tiny"), dtype)
    mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    total = routed = 0
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(shapes), specs, strict=True):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        sharding = NamedSharding(mesh, partition_spec(tuple(spec), leaf.shape, mesh, name))
        n = math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(dtype).itemsize
        total += n
        routed += n if name.endswith(("mlp.gate_up", "mlp.down")) else 0
    return total, routed


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One plan of both steps on data=2,expert=2: (completed process, JSON report)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = plan(*TINY, "--mesh", "data=2,expert=2", "--mode", "both", "--json", str(path))
    assert result.returncode == 0, result.stderr
    return result, json.loads(path.read_text())


def test_parse_size():
    parse_bytes = lambda text: parse_size(text, "--hbm", PlanError, unit_required=True)  # noqa: E731
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("95gb") == 95 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5TB") == 1_500_000_000_000
    assert parse_bytes("512MiB") == 512 * 2**20
    for bad in ("80", "GB", "-1GB", "0GB", "80 GBs", "eighty GB"):
        with pytest.raises(PlanError, match="--hbm '.*': expected a positive size"):
            parse_bytes(bad)
    assert parse_size("100KB", "--max-shard-size") == 100_000 and parse_size("4096", "--max-shard-size") == 4096


def test_analytic_parameter_bytes_match_the_param_tree(both):
    _, report = both
    mesh = {"data": 2, "expert": 2}
    infer, train = report["inference"]["analytic"], report["train"]["analytic"]
    assert (infer["params"], infer["routed_experts"]) == independent_param_bytes(mesh, jnp.bfloat16)
    assert (train["params"], train["routed_experts"]) == independent_param_bytes(mesh, jnp.float32)
    assert train["adam"] == 2 * train["params"]
    assert train["compute_copy"] == infer["params"]  # the f32 master params cast to bfloat16


def test_expert_axis_splits_the_expert_bytes(both):
    _, report = both
    unsharded_total, unsharded_routed = independent_param_bytes({"data": 1}, jnp.bfloat16)
    infer = report["inference"]["analytic"]
    assert infer["routed_experts"] * 2 == unsharded_routed
    assert infer["params"] - infer["routed_experts"] == unsharded_total - unsharded_routed  # the rest replicated


def test_compiled_numbers_cover_the_params(both):
    result, report = both
    infer, train = report["inference"], report["train"]
    for step in ("prefill", "decode"):
        assert infer["compiled"][step]["argument"] >= infer["analytic"]["params"]
    assert infer["compiled"]["decode"]["alias"] > 0  # the decode state (KV cache) is donated
    assert infer["compiled"]["prefill"]["output"] >= infer["analytic"]["kv_cache"]
    compiled = train["compiled"]["step"]
    assert compiled["argument"] >= train["analytic"]["params"] + train["analytic"]["adam"]
    assert compiled["peak"] == compiled["argument"] + compiled["output"] - compiled["alias"] + compiled["temp"]
    assert report["fits"] and result.stdout.count(": fits in 80GB") == 2
    assert "mesh data=2, expert=2 (4 virtual CPU devices)" in result.stdout


def test_too_small_hbm_does_not_fit_and_exits_1(tmp_path, capfd):
    """Run in this process: JAX is already up with too few devices here, so the plan re-runs itself."""
    jax.devices()
    path = tmp_path / "plan.json"
    assert main(["plan", *TINY, "--mesh", "expert=4", "--mode", "infer", "--hbm", "1KiB", "--json", str(path)]) == 1
    out = capfd.readouterr().out
    assert "inference: DOES NOT FIT in 1KiB" in out
    report = json.loads(path.read_text())
    assert report["fits"] is False and "train" not in report
    total, routed = independent_param_bytes({"data": 1}, jnp.bfloat16)
    assert report["inference"]["analytic"]["routed_experts"] * 4 == routed
    assert (report["inference"]["analytic"]["params"], report["inference"]["analytic"]["routed_experts"]) == (
        independent_param_bytes({"expert": 4}, jnp.bfloat16)
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh", "expert=x"], "aria-jax plan: error: mesh 'expert=x': 'expert=x' is not AXIS=SIZE with a positive integer size"),
        (["--mesh", "pipe=2"], "aria-jax plan: error: mesh 'pipe=2': unknown axis 'pipe'; use data, expert, tensor"),
        (["--mesh", "expert=2", "--hbm", "80"], "aria-jax plan: error: --hbm '80': expected a positive size like 5GB, 500MB or 16GiB"),
        (["--mesh", "expert=3"], "aria-jax plan: error: language_model.layers.mlp.down: moe_num_experts=4 does not divide over mesh axis 'expert' of size 3 (use expert=1, 2, 4)"),
        (["--mesh", "data=2", "--batch", "3"], "aria-jax plan: error: --batch 3 does not divide over mesh axis 'data' of size 2"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = plan(*TINY, *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
