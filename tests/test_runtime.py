"""aria_jax.runtime: the platform's choices, made once, and the user's overrides of them."""

import pytest

from aria_jax import runtime
from aria_jax.runtime import Runtime, with_overrides


def test_detect_on_this_machine_is_the_cpu_choice():
    if runtime.platform() != "cpu":
        pytest.skip("the CPU's choices")
    chosen = runtime.detect()
    assert (chosen.experts, chosen.layout, chosen.scan_layers, chosen.matvec_split) == ("blocked", "unrolled", False, 2)


def test_overrides_change_only_the_named_fields():
    base = Runtime("cpu", experts="blocked", layout="unrolled", scan_layers=False, matvec_split=2,
                   decode_options=runtime.CPU_DECODE_OPTIONS)
    got = with_overrides("experts=ragged, layout=stacked,matvec_split=1,decode_options=none", base)
    assert got == Runtime("cpu", experts="ragged", layout="stacked", scan_layers=False, matvec_split=1)
    assert with_overrides(None, base) is base and with_overrides("", base) is base


@pytest.mark.parametrize("spec, message", [
    ("experts=fast", "unknown experts kernel 'fast'"),
    ("layout=diagonal", "unknown layout 'diagonal'"),
    ("matvec_split=0", "matvec_split must be an integer >= 1, got 0"),
    ("matvec_split=two", "matvec_split must be an integer >= 1, got 'two'"),
    ("decode_options=fast", "decode_options can only be turned off"),
    ("platform=tpu", "unknown runtime key 'platform'"),
    ("experts", "'experts' is not KEY=VALUE"),
    ("experts=", "'experts=' is not KEY=VALUE"),
])
def test_bad_overrides_name_the_key_or_value(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with_overrides(spec, Runtime())


def test_cpu_runs_the_pallas_kernels_in_interpret_mode_and_accepts_them_by_name():
    if runtime.platform() != "cpu":
        pytest.skip("the CPU's choices")
    assert runtime.detect().pallas_interpret
    for kernel in ("pallas", "megablox", "tokamax"):
        assert with_overrides(f"experts={kernel}", runtime.detect()).experts == kernel


@pytest.mark.parametrize("name, tokamax, experts", [
    ("tpu", False, "megablox"), ("gpu", True, "tokamax"), ("gpu", False, "pallas"), ("cpu", False, "blocked"),
])
def test_each_platform_gets_its_expert_kernel(monkeypatch, name, tokamax, experts):
    """Accelerators compile their Pallas kernels (no interpreter); GPUs take tokamax where it is installed."""
    monkeypatch.setattr(runtime, "platform", lambda: name)
    if name == "gpu":
        monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda module: object() if tokamax else None)
    chosen = runtime.detect.__wrapped__()
    assert chosen.experts == experts and chosen.pallas_interpret == (name == "cpu")
