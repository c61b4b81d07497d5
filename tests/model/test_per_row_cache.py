"""KV caches whose rows sit at different slots (the server's slot pool): a per-row write index gives each row
exactly what it gets alone, for both parameter layouts and an int8 cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax import Aria, AriaConfig
from aria_jax.model.kv_cache import init_cache
from aria_jax.runtime import Runtime

TINY = AriaConfig.preset("tiny")


def run_row(model, ids, cache_len, kv_int8, steps, apply):
    """One row alone: its prompt at slot 0, then ``steps`` greedy tokens, each at the next slot. Returns the
    logits of every step."""
    m = model.module
    t = ids.shape[1]
    cache = init_cache(m.config.text, 1, cache_len, m.dtype, m.layout != "stacked", kv_int8)
    mask = jnp.zeros((1, cache_len), jnp.int32).at[:, :t].set(1)
    out = apply({"params": model.params}, jnp.asarray(ids), mask, positions=jnp.arange(t)[None], cache=cache,
                index=jnp.int32(0))
    logits, cache = [out.logits[:, 0]], out.cache
    for s in range(steps):
        token = jnp.argmax(logits[-1], axis=-1)
        mask = mask.at[:, t + s].set(1)
        out = apply({"params": model.params}, token[:, None], mask, positions=jnp.full((1, 1), t + s),
                    cache=cache, index=jnp.int32(t + s))
        logits.append(out.logits[:, 0])
        cache = out.cache
    return np.stack([np.asarray(x[0]) for x in logits]), cache


@pytest.mark.parametrize("layout,kv_int8", [("stacked", False), pytest.param("per_layer", False, marks=pytest.mark.slow),
                                            ("stacked", True)])
def test_rows_at_their_own_slots_match_each_row_alone(layout, kv_int8):
    model = Aria.from_config(TINY, seed=0, dtype="float32", runtime=Runtime("cpu", experts="dense", layout=layout))
    m = model.module
    vocab = m.config.text.vocab_size
    rng = np.random.default_rng(0)
    lengths, steps, cache_len = (5, 9), 3, 16
    prompts = [rng.integers(3, vocab, (1, n)) for n in lengths]
    apply = jax.jit(functools.partial(m.apply, last_only=True))  # one compiled program per input shape
    alone = [run_row(model, p, cache_len, kv_int8, steps, apply) for p in prompts]
    # the pool: each row's prefilled cache copied into its row, then decode steps with one index per row
    pool = jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=-4),  # the batch axis of (..., B, kv, *, *)
                        *[run_row(model, p, cache_len, kv_int8, 0, apply)[1] for p in prompts])
    index = jnp.asarray(lengths, jnp.int32)
    mask = jnp.asarray([[1 if j < n else 0 for j in range(cache_len)] for n in lengths], jnp.int32)
    token = jnp.asarray([np.argmax(a[0][0]) for a in alone])
    for s in range(steps):
        mask = jax.vmap(lambda row, i: row.at[i].set(1))(mask, index)
        out = apply({"params": model.params}, token[:, None], mask, positions=index[:, None], cache=pool,
                    index=index)
        for r in range(2):
            np.testing.assert_allclose(np.asarray(out.logits[r, 0]), alone[r][0][s + 1], rtol=0, atol=2e-5)
        pool, index, token = out.cache, index + 1, jnp.argmax(out.logits[:, 0], axis=-1)
