"""8 CPU devices: quantized weights (int8, int4 packed) on several meshes, expert parallelism included, give the
logits and greedy tokens of one device."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from mesh_fixtures import batch, make_checkpoint, rel  # noqa: E402

from aria_jax import Aria  # noqa: E402
from aria_jax.runtime import detect  # noqa: E402

assert jax.device_count() == 8
directory = tempfile.mkdtemp()
make_checkpoint(directory)
b = batch()
valid = b["attention_mask"].astype(bool)
for fmt in ("int8", "int4"):
    runtime = detect().replace(int4_packed=True)  # the accelerators' holding: int4 two per byte
    single = Aria.from_pretrained(directory, dtype="float32", layout="stacked", quantize=fmt, runtime=runtime)
    ref_logits = np.asarray(single.forward(**b))
    ref_tokens = single.generate(**b, max_new_tokens=6)
    for spec in {"int8": ("data=2,expert=4", "expert=4,tensor=2"), "int4": ("expert=8",)}[fmt]:
        model = Aria.from_pretrained(directory, dtype="float32", mesh=spec, quantize=fmt, runtime=runtime)
        q = model.params["language_model"]["layers"]["mlp"]["gate_up_q"]
        assert len(q.sharding.device_set) == 8 and q.dtype == (np.int8 if fmt == "int8" else np.uint8), spec
        shard_bytes = {s.data.nbytes for s in q.addressable_shards}
        assert max(shard_bytes) < q.nbytes, spec  # each device holds a slice of the quantized experts
        err = rel(np.asarray(model.forward(**b))[valid], ref_logits[valid])
        print(f"{fmt} {spec}: logits vs 1 device {err:.1e}")
        assert err <= 1e-5, (fmt, spec)
        np.testing.assert_array_equal(model.generate(**b, max_new_tokens=6), ref_tokens)
print("OK")
