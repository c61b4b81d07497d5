import contextlib
import importlib.abc
import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))
pytest_plugins = ["serve_fixtures"]  # the server's fixtures (tests/serve_fixtures.py: why not tests/serve/conftest.py)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No test writes to the user's compilation cache (aria_jax/compile_cache.py): the CLI runs of the suite, in process or
# in subprocesses, run without it; tests/cli/test_compile_cache.py gives its runs a cache of their own.
os.environ["ARIA_JAX_NO_COMPILE_CACHE"] = "1"

LAYOUTS = ("hub", "transformers5", "original")

# Fuzz tests (hypothesis): the default profile keeps the default run short; `HYPOTHESIS_PROFILE=slow` runs many more
# examples (README: Test).
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("default", max_examples=60, **_FUZZ)
settings.register_profile("slow", max_examples=2000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The reference (transformers on torch) is optional: without it (the newest-JAX CI leg) every test that uses one of
# these fixtures, or is marked `torch` (subprocesses that need it), is skipped, and so is a test module or test that
# imports torch, transformers or peft itself (as pytest.importorskip would).
REFERENCE = ("torch", "transformers", "peft")
REFERENCE_FIXTURES = {"hf_model", "checkpoint", "aria_model", "chat_dir"}
HAVE_REFERENCE = all(importlib.util.find_spec(name) is not None for name in REFERENCE[:2])
TESTS = os.path.dirname(os.path.abspath(__file__))


class SkipWithoutReference(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path, so asked only for a module no other finder has: an import of torch, transformers or
    peft by a file under tests/, directly or through the top level of modules it imports (`import safetensors.torch`),
    skips the test module or test doing it; an import from inside any other function gets ModuleNotFoundError."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in REFERENCE:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if os.path.abspath(filename).startswith(TESTS + os.sep):
                pytest.skip(f"needs {top} (the reference), not installed", allow_module_level=True)
            if not filename.startswith("<") and frame.f_code.co_name != "<module>":  # not importlib, not an import
                return None
            frame = frame.f_back
        return None


# Only where the reference is absent: with it installed, a missing optional submodule that transformers or torch probe
# for would otherwise skip the test that imported them.
if not HAVE_REFERENCE and not any(type(f).__name__ == SkipWithoutReference.__name__ for f in sys.meta_path):
    sys.meta_path.append(SkipWithoutReference())


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: needs torch and transformers (skipped where they are not installed)")
    config.addinivalue_line("markers", "each_value_once: of a parametrized test's cases, the default run keeps a few "
                            "that together show each value of each parameter; the others are `slow`")


def axis_values(case) -> list[tuple]:
    """(names, values) of each parametrize axis of a case; names given together ("fmt,packed") are one axis."""
    out = []
    for mark in case.iter_markers("parametrize"):
        names = mark.args[0]
        names = tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)
        out.append((names, repr(tuple(case.callspec.params[n] for n in names))))
    return out


def each_value_once(items) -> None:
    """For each test marked ``each_value_once``: keep the fewest cases, picked greedily (the case showing the most
    parameter values not yet shown, the earliest on ties), that show every value of every parameter; mark the others
    `slow`. A product (backends x formats x sizes) then costs the default run about as many cases as its longest
    axis, its values mixed along a diagonal; `-m slow` runs the rest of the product."""
    groups = {}
    for item in items:
        if item.get_closest_marker("each_value_once") is not None and hasattr(item, "callspec"):
            groups.setdefault(item.function, []).append(item)
    for cases in groups.values():
        values = {case: set(axis_values(case)) for case in cases}
        shown, left = set(), list(cases)
        while left:
            best = max(left, key=lambda case: len(values[case] - shown))  # max() keeps the earliest on ties
            if not values[best] - shown:
                break
            shown |= values[best]
            left.remove(best)
        for case in left:
            case.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by mark (`-m 'not slow'`)
def pytest_collection_modifyitems(config, items):
    each_value_once(items)
    if HAVE_REFERENCE:
        return
    skip = pytest.mark.skip(reason="needs torch and transformers (the reference), not installed")
    for item in items:
        if REFERENCE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("torch"):
            item.add_marker(skip)


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs mounted at ``path`` (``ro,size=1m`` read-only, ``size=128k`` tiny, ...) for the block, yielding
    ``path``; None where mount is not permitted (the tests then fall back to monkeypatching)."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds`` (a hang fails the test)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def traced_params(cfg, dtype):
    """(ShapeDtypeStructs, logical axis specs) from an abstract init of the Flax model: the independent reference the
    parameter schema (aria_jax.model.schema) is held against."""
    import flax.linen as nn
    import jax

    from aria_jax.model.aria import AriaModel, example_inputs

    model = AriaModel(cfg, dtype=dtype, moe_backend="dense")
    boxed = jax.eval_shape(model.init, jax.random.key(0), **example_inputs(cfg))["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|: the project's parity measure."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def hf_model():
    """Cached tiny random transformers models by config name."""
    import hf_models

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = hf_models.make_hf_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, hf_model):
    """Cached checkpoint directories by (config name, layout)."""
    import hf_models

    cache = {}

    def get(name: str, layout: str = "hub") -> str:
        if (name, layout) not in cache:
            directory = str(tmp_path_factory.mktemp(f"{name}-{layout}"))
            cache[name, layout] = hf_models.save_layout(hf_model(name), layout, directory)
        return cache[name, layout]

    return get


@pytest.fixture(scope="session")
def aria_model(checkpoint):
    """Cached float32 aria_jax models loaded from the hub layout, by config name."""
    from aria_jax import Aria

    cache = {}

    def get(name: str, layout: str = "hub"):
        if (name, layout) not in cache:
            cache[name, layout] = Aria.from_pretrained(checkpoint(name, layout), dtype="float32")
        return cache[name, layout]

    return get


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    """A checkpoint with tokenizer, chat template and processor configs: (directory, transformers model)."""
    import hf_models
    from aria_proc_dirs import write_dir

    directory = str(tmp_path_factory.mktemp("chat"))
    model = hf_models.make_hf_model("chat")
    hf_models.save_layout(model, "hub", directory)
    write_dir(directory, size_conversion={490: 4, 980: 8})
    return directory, model
