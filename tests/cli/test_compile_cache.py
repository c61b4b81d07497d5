"""The persistent compilation cache (aria_jax/compile_cache.py): where it goes, how it is turned off, and a second
``aria-jax generate`` on the same model loading its compiled programs instead of compiling them again.

Every JAX here runs in a subprocess with a cache directory of its own: the suite's process never changes its JAX
configuration, and nothing is written to the user's cache."""

import json
import os
import subprocess
import sys

import pytest

from aria_jax import compile_cache

# For each case (environment variables, --no-compile-cache given): the cache settings enable() leaves in JAX. One
# process for all (nothing compiles in it): the settings are put back to JAX's defaults between cases.
PROBE = """
import json, os, sys
import jax
from aria_jax import compile_cache
out = []
for env, off in json.loads(sys.argv[1]):
    for name in (compile_cache.OFF_ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        os.environ.pop(name, None)
    os.environ.update(env)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    returned = compile_cache.enable(off=off)
    out.append({"returned": returned, "enabled": jax.config.jax_enable_compilation_cache,
                "dir": jax.config.jax_compilation_cache_dir,
                "min_secs": jax.config.jax_persistent_cache_min_compile_time_secs})
print(json.dumps(out))
"""
# Runs the real `aria-jax` entry point and prints JAX's compilation-cache events (jax.monitoring) on the last line.
RUNNER = """
import json, sys
import jax.monitoring
events = {}
jax.monitoring.register_event_listener(lambda event, **kw: events.__setitem__(event, events.get(event, 0) + 1))
from aria_jax.cli import main
status = main(sys.argv[1:])
print("EVENTS " + json.dumps({k.rsplit("/", 1)[1]: v for k, v in events.items() if "compilation_cache" in k}))
sys.exit(status)
"""


def clean_env(**extra: str) -> dict:
    """The environment without any cache setting of the user's or the suite's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in (compile_cache.OFF_ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")
           and not k.startswith("JAX_PERSISTENT_CACHE")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def probe(*cases: tuple[dict, bool]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_directory_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "aria-jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache" / "aria-jax" / "xla")


@pytest.mark.parametrize("value, off", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_switched_off_by_the_flag_or_the_variable(monkeypatch, value, off):
    monkeypatch.setenv(compile_cache.OFF_ENV, value)
    assert compile_cache.switched_off() is off
    assert compile_cache.switched_off(True) is True


def test_the_flag_is_taken_from_anywhere_on_the_line():
    assert compile_cache.strip_flag(["generate", "--model", "m", "--no-compile-cache"]) == (
        ["generate", "--model", "m"], True)
    assert compile_cache.strip_flag(["--no-compile-cache", "plan"]) == (["plan"], True)
    assert compile_cache.strip_flag(["plan"]) == (["plan"], False)


def test_enable_sets_the_directory_and_threshold_or_turns_the_cache_off(tmp_path):
    xdg, mine = str(tmp_path), str(tmp_path / "mine")
    (tmp_path / "blocked").write_text("a file where the cache directory would go")
    on, user, flag, variable, blocked = probe(
        ({"XDG_CACHE_HOME": xdg}, False),
        ({"XDG_CACHE_HOME": xdg, "JAX_COMPILATION_CACHE_DIR": mine}, False),  # the user's own directory is kept
        ({"XDG_CACHE_HOME": str(tmp_path / "a")}, True),
        ({"XDG_CACHE_HOME": str(tmp_path / "b"), compile_cache.OFF_ENV: "1"}, False),
        ({"XDG_CACHE_HOME": str(tmp_path / "blocked")}, False),
    )
    want = str(tmp_path / "aria-jax" / "xla")
    assert on == {"returned": want, "enabled": True, "dir": want, "min_secs": compile_cache.MIN_COMPILE_SECS}
    assert os.path.isdir(want)
    assert user["returned"] == user["dir"] == mine and user["enabled"] and os.path.isdir(mine)
    for off in (flag, variable, blocked):  # off, and JAX told so (a JAX_COMPILATION_CACHE_DIR is not used either)
        assert off["returned"] is None and off["enabled"] is False
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """The demo's tiny random model, converted (no torch needed)."""
    from aria_jax.checkpoint.convert import convert
    from aria_jax.cli.demo import build_random_checkpoint

    directory = tmp_path_factory.mktemp("tiny")
    hf_dir = build_random_checkpoint(str(directory))
    convert(hf_dir, str(directory / "converted"), progress=False)
    return str(directory / "converted")


def generate(model: str, env: dict, *flags: str) -> dict:
    args = [*flags, "generate", "--model", model, "--prompt", "describe the image", "--max-new-tokens", "3"]
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("EVENTS "))
    return {name: events.get(name, 0) for name in ("compile_requests_use_cache", "cache_hits", "cache_misses")}


@pytest.mark.slow  # two generate runs in fresh processes: ~40 s
def test_a_second_generate_loads_its_programs_from_the_cache(converted, tmp_path):
    env = clean_env(XDG_CACHE_HOME=str(tmp_path))
    directory = tmp_path / "aria-jax" / "xla"
    first = generate(converted, env)
    entries = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert first["cache_misses"] > 0 and len(entries) >= first["cache_misses"]  # written, one file or more each
    second = generate(converted, env)
    assert second["cache_hits"] >= first["cache_misses"]  # everything the first run wrote was found
    compiled = {run: r["compile_requests_use_cache"] - r["cache_hits"] for run, r in (("1", first), ("2", second))}
    assert compiled["2"] < compiled["1"], (first, second)
    assert second["cache_misses"] == 0, (first, second)  # nothing compiled again, so nothing new written
    # off: nothing read or written
    third = generate(converted, env, "--no-compile-cache")
    assert third == {"compile_requests_use_cache": 0, "cache_hits": 0, "cache_misses": 0}
