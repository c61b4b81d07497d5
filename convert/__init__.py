"""``python -m convert SRC DST ...``: the checkpoint conversion tool (logic in ``aria_jax.convert``)."""
