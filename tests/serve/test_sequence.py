"""A request's text as tokens come: stop strings cut it (never shown in part), the end of turn and eos end it."""

from aria_jax.serve.sequence import Generated

VOCAB = {1: "he", 2: "llo", 3: " wor", 4: "ld", 5: "<|im_end|>", 6: "!", 9: "</s>"}


def decode(tokens, skip_special_tokens=False):
    return "".join(VOCAB[t] for t in tokens if not (skip_special_tokens and t in (5, 9)))


def feed(gen, tokens):
    return [gen.add(t) for t in tokens]


def test_pieces_join_to_the_text_and_length_ends_it():
    gen = Generated(decode, eos_ids=(9,), max_tokens=3)
    assert feed(gen, [1, 2, 3]) == ["he", "llo", " wor"] and gen.finish_reason == "length"


def test_end_of_turn_and_eos_end_it():
    gen = Generated(decode, eos_ids=(9,), max_tokens=10)
    assert "".join(feed(gen, [1, 5])) == "he" and gen.finish_reason == "stop"
    gen = Generated(decode, eos_ids=(9,), max_tokens=10)
    assert "".join(feed(gen, [1, 9])) == "he" and gen.finish_reason == "stop" and gen.completion_tokens == 2


def test_a_stop_string_is_held_back_then_cut():
    gen = Generated(decode, eos_ids=(9,), max_tokens=10, stop=("o wo",))
    pieces = feed(gen, [1, 2, 3])
    assert gen.finish_reason == "stop" and "".join(pieces) == "hell" and gen.text() == "hell"
    gen = Generated(decode, eos_ids=(9,), max_tokens=4, stop=("xyz",))
    pieces = feed(gen, [1, 2, 3, 4])
    assert pieces[0] == "" and "".join(pieces) == "hello world" and gen.finish_reason == "length"
