"""The slot pool's step program: ``count`` steps in one program give the tokens and the state of ``count`` programs of
one step, and a row stops inside the program at an eos id or at its token budget (its slot index stops there, so it
never writes past its room)."""

import jax
import numpy as np

from aria_jax.serve.pool import RowSampling, SlotPool

ROWS, SLOTS = 3, 48


def sampling(rows: int = ROWS) -> RowSampling:
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in range(rows)])
    return RowSampling(np.array([0.0, 0.8, 0.0], np.float32), np.array([1.0, 0.9, 1.0], np.float32), keys)


def admitted(model, eos_ids=(), max_steps=1) -> SlotPool:
    """A pool whose rows 0 and 1 hold two different prompts; row 2 idle."""
    pool = SlotPool(model.module, model.params, ROWS, SLOTS, max_steps=max_steps, eos_ids=eos_ids)
    for row, text in enumerate(["the quick brown fox", "hi there"]):
        batch = model.processor.chat_inputs([{"role": "user", "content": [{"type": "text", "text": text}]}])
        ids = np.asarray(batch["input_ids"], np.int32)
        pad = 16 - ids.shape[1]
        ids = np.concatenate([np.zeros((1, pad), np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((1, pad), np.int32), np.asarray(batch["attention_mask"], np.int32)], axis=1)
        one = RowSampling(*(np.asarray(x)[row:row + 1] for x in (sampling().temperature, sampling().top_p,
                                                                   sampling().key)))
        pool.admit([row], ids, mask, None, None, one)
    return pool


def test_several_steps_in_one_program_equal_single_steps_and_rows_stop_inside(tiny_model):
    active = np.array([True, True, False])
    steps = np.array([1, 1, 0], np.int32)
    limit = np.array([40, 40, 0], np.int32)
    single = admitted(tiny_model)
    expected = np.stack([single.step(active, steps + j, limit, sampling())[0] for j in range(5)])

    many = admitted(tiny_model, max_steps=8)
    tokens = many.step(active, steps, limit, sampling(), count=5)
    assert tokens.shape == (5, ROWS)
    np.testing.assert_array_equal(tokens[:, :2], expected[:, :2])
    for name in ("index", "position", "token", "mask"):
        np.testing.assert_array_equal(np.asarray(getattr(many.state, name)), np.asarray(getattr(single.state, name)))
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(many.state.cache)[0]),
                               np.asarray(jax.tree.leaves(single.state.cache)[0]), rtol=1e-5, atol=1e-6)

    # row 0 meets an eos id at its 3rd step, row 1 its budget after 2 more tokens: both stop advancing there
    start_index = np.asarray(admitted(tiny_model).state.index)
    stopping = admitted(tiny_model, eos_ids=(int(expected[2, 0]),), max_steps=8)
    tokens = stopping.step(active, steps, np.array([40, 3, 0], np.int32), sampling(), count=6)
    np.testing.assert_array_equal(tokens[:3, 0], expected[:3, 0])
    np.testing.assert_array_equal(tokens[:2, 1], expected[:2, 1])
    index = np.asarray(stopping.state.index)
    first_eos = int(np.argmax(expected[:, 0] == expected[2, 0]))
    assert index[0] - start_index[0] == first_eos + 1  # up to and with its first eos token
    assert index[1] - start_index[1] == 2  # steps 1 -> 3 = its budget
    assert index[2] == start_index[2]  # the idle row stays put
    assert stopping.state.token[1] == expected[1, 1]


def test_a_lone_row_decodes_in_the_one_row_pool_and_moves_back(tiny_model):
    steps, limit = np.array([1, 1, 0], np.int32), np.array([40, 40, 0], np.int32)
    both, lone_1, lone_0 = np.array([True, True, False]), np.array([False, True, False]), np.array([True, False, False])
    together = admitted(tiny_model, max_steps=4)
    expected = together.step(both, steps, limit, sampling(), count=3)
    expected_last = together.step(both, steps + 3, limit, sampling(), count=1)

    apart = admitted(tiny_model, max_steps=4)
    got_1 = apart.step(lone_1, steps, limit, sampling(), count=3)  # row 1 alone: moved to the one-row pool
    assert apart.single == 1
    got_0 = apart.step(lone_0, steps, limit, sampling(), count=3)  # row 1 back, row 0 alone
    assert apart.single == 0
    got_last = apart.step(both, steps + 3, limit, sampling(), count=1)  # both in the pool again
    assert apart.single is None and apart.traces["move"] == 2
    np.testing.assert_array_equal(got_1[:, 1], expected[:, 1])
    np.testing.assert_array_equal(got_0[:, 0], expected[:, 0])
    np.testing.assert_array_equal(got_last[:, :2], expected_last[:, :2])
    for name in ("index", "position", "token", "mask"):
        np.testing.assert_array_equal(np.asarray(getattr(apart.state, name)), np.asarray(getattr(together.state, name)))
    for a, b in zip(jax.tree.leaves(apart.state.cache), jax.tree.leaves(together.state.cache), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # a new request admitted into the row whose copy is in the one-row pool: that copy is dropped, not moved back
    apart.step(lone_0, steps + 4, limit, sampling(), count=1)
    assert apart.single == 0
    apart_index = np.asarray(apart.state.index).copy()
    batch = tiny_model.processor.chat_inputs([{"role": "user", "content": [{"type": "text", "text": "new"}]}])
    ids = np.asarray(batch["input_ids"], np.int32)
    one = RowSampling(*(np.asarray(x)[:1] for x in (sampling().temperature, sampling().top_p, sampling().key)))
    apart.admit([0], ids, np.ones_like(ids), None, None, one)
    assert apart.single is None and int(apart.state.index[0]) == ids.shape[1] != apart_index[0]
    apart.step(both, steps, limit, sampling(), count=1)
    assert int(apart.state.index[0]) == ids.shape[1] + 1  # the new row advanced, not the old copy
