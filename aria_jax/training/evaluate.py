"""Evaluation (``eval_strategy``): the loss on every dataset's test split (``DIR/test.jsonl``, or
``dataset_test_split``), each sample once, logged as ``eval_loss`` (the token-mean cross-entropy of the assistant
turns) with ``eval_label_tokens``, ``eval_samples`` and ``eval_dropped_samples``.

Samples are encoded and truncated as for training (a sample that truncation would cut through an image is dropped
and counted). Every process encodes every row of an evaluation batch and keeps its own block, so the processes of a
multi-host run take the same decisions without talking to each other; the last batch is filled up with copies of
its last sample whose labels are all ignored (no effect on the loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training import steps as S
from aria_jax.training.config import TrainConfig
from aria_jax.training.losses import IGNORE_INDEX
from aria_jax.training.metrics_log import warn
from aria_jax.training.plan import Rows


@dataclasses.dataclass
class EvalSet:
    encode: Callable[[int], D.Sample | None]  # sample i, truncated; None: dropped
    size: int
    batch_size: int  # rows of one global batch
    collate: Callable[[list[D.Sample], D.Layout], dict]
    rows: Rows = Rows()
    dropped: int = 0  # of the last pass

    def batches(self) -> Iterator[dict]:
        """This process's rows of every evaluation batch, one pass over the samples."""
        self.dropped = 0
        pending: list[D.Sample] = []
        for i in range(self.size):
            sample = self.encode(i)
            if sample is None:
                self.dropped += 1
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        if pending:
            yield self._collate(pending)

    def _collate(self, samples: list[D.Sample]) -> dict:
        filler = dataclasses.replace(samples[-1], labels=np.full_like(samples[-1].labels, IGNORE_INDEX))
        samples = samples + [filler] * (self.batch_size - len(samples))
        metas = [D.meta_of(s) for s in samples]
        lo, hi = D.row_range(self.batch_size, self.rows.index, self.rows.count)
        layout = D.layout_for(metas, self.rows.index, self.rows.count, self.rows.image_multiple)
        return self.collate(samples[lo:hi], layout)


def load_eval_records(cfg: TrainConfig, log: Callable[[str], None], progress: bool = False
                      ) -> tuple[list[J.Record], dict]:
    """The test samples (checked like the training ones, before step 0) and their image sizes; none when
    evaluation is off or no dataset has a test split (then one line says so, as the original turns it off)."""
    if cfg.eval_strategy == "no" and not cfg.eval_on_start:
        return [], {}
    split = f"{cfg.dataset_test_split}.jsonl"
    if cfg.dataset_mixer is None:
        log(f"eval_strategy {cfg.eval_strategy}: the synthetic dataset has no {split}: no evaluation")
        return [], {}
    records, files = J.load_eval_records(cfg.dataset_mixer, cfg.dataset_test_split)
    if not records:
        log(f"eval_strategy {cfg.eval_strategy}: no dataset of dataset_mixer has a {split}: no evaluation (as the "
            "original)")
        return [], {}
    records, _, sizes = J.check_images(records, cfg.skip_bad_samples, log, progress=progress)
    log(f"evaluation: {len(records)} samples of {', '.join(files)}")
    return records, sizes


def build_eval(cfg: TrainConfig, processor, records: list[J.Record], sizes: dict, rows: Rows, batch_size: int,
               pixel_shape: tuple[int, ...], log: Callable[[str], None]) -> EvalSet | None:
    if not records:
        return None
    J.check_placeholders(records, processor.image_token)
    encoder = D.JsonlEncoder(processor, cfg.max_image_size, cfg.split_image, sizes)
    # every process decodes every evaluation image, so all of them drop a bad one alike
    source = D.build_source(records, encoder, cfg.max_seq_length, D.BadImages(cfg.skip_bad_samples, 1, log))
    pad_id = processor.pad_token_id or 0
    collate = lambda samples, layout: D.collate(samples, pad_id, cfg.max_seq_length, pixel_shape, layout)
    return EvalSet(source, len(records), batch_size, collate, rows)


def make_eval_fn(module, spec: S.LossSpec) -> Callable:
    """``eval_fn(trainable, frozen, batch, rng, denom) -> (value, metrics)``: the training objective without
    dropout, jitted."""
    return jax.jit(S.make_objective(module, dataclasses.replace(spec, lora_dropout=0.0)))


def evaluate(eval_set: EvalSet, eval_fn: Callable, trainable: dict, frozen: dict, to_global: Callable[[dict], dict],
             log: Callable[[str], None]) -> dict | None:
    """One pass over the evaluation samples -> the eval_* metrics (None, with one warning, when every sample is
    dropped)."""
    ce, tokens = 0.0, 0
    for batch in eval_set.batches():
        _, m = eval_fn(trainable, frozen, to_global(batch), jax.random.key(0), jnp.float32(1.0))
        ce += float(m["ce_sum"])
        tokens += int(m["label_tokens"])
    if tokens == 0:
        warn(log, "evaluation: every test sample is dropped (max_seq_length cuts through their images or leaves "
                  "them no assistant token): no eval_loss")
        return None
    return {"eval_loss": ce / tokens, "eval_label_tokens": tokens, "eval_samples": eval_set.size - eval_set.dropped,
            "eval_dropped_samples": eval_set.dropped}
