"""Per-row sampling: each row picks what ``inference.sampling.select_tokens`` picks for its own configuration."""

import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.inference.sampling import SamplingConfig, select_tokens
from aria_jax.serve import sampling

select_rows = jax.jit(sampling.select_rows)


def test_each_row_samples_as_alone():
    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    temperature = jnp.asarray([0.0, 0.7, 1.3, 0.0])
    top_p = jnp.asarray([1.0, 0.9, 0.5, 0.3])
    seeds = (0, 11, 12345, 7)
    for step in range(3):
        keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
        got = np.asarray(select_rows(logits, keys, jnp.full((4,), step), temperature, top_p))
        for r in range(4):
            t = float(temperature[r])
            cfg = SamplingConfig(do_sample=t > 0, temperature=t if t > 0 else 1.0, top_p=float(top_p[r]))
            key = jax.random.fold_in(jax.random.key(seeds[r]), step)
            assert got[r] == int(select_tokens(logits[r:r + 1], key, cfg)[0]), (step, r)


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.05, 0.05]]))
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in range(1)])
    many = jax.jit(jax.vmap(lambda step, top_p: select_rows(logits, keys, step[None], jnp.ones(1), top_p[None])[0],
                            in_axes=(0, None)))
    assert set(np.asarray(many(jnp.arange(200), 0.5)).tolist()) == {0}
    assert {0, 1} <= set(np.asarray(many(jnp.arange(200), 1.0)).tolist())
