"""Fine-tuning batches: samples encoded with the processor, label masking, truncation, padded batches, and the
resumable seeded order (``Loader``) over a dataset (``aria_jax.training.dataset``).

Labels cover assistant turns only (their role header and image tokens excluded). A sample that truncation to
``max_seq_length`` would cut through an image, or leave without a trained token, is dropped and counted.

A video sample's ``{"type": "video"}`` item becomes its sampled frames (``sample_indices`` over the header's frame
count), each as ``"[MM:SS]"``, an image and ``"\n"`` (``video_content``), every frame one image at
``max_image_size`` (never split). The frames are chosen from the header alone, so ``measure`` counts their tokens
without decoding and agrees with ``__call__``.

Multi-host: every process walks the same seeded order and decides the same global batches from cheap per-sample
metadata (``Meta``: token count after truncation, image count, trained label count), then encodes, loads images for
and collates only its own contiguous block of rows (``Loader``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from aria_jax.errors import ImageError, InputError, one_line
from aria_jax.inference.image_processor import image_size, load_image
from aria_jax.inference.video import VideoError, VideoInfo, load_frames, probe, sample_indices, video_content
from aria_jax.training.config import RecipeError
from aria_jax.training.dataset import Record, image_items
from aria_jax.training.losses import IGNORE_INDEX


@dataclasses.dataclass
class Sample:
    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX where not trained on
    pixel_values: np.ndarray | None = None  # (N, 3, S, S) float32
    pixel_mask: np.ndarray | None = None  # (N, S, S) bool


@dataclasses.dataclass(frozen=True)
class Meta:
    """What deciding a global batch needs to know of a sample, without building it."""

    length: int  # tokens after truncation
    images: int  # pixel arrays (image crops) it brings
    labels: int  # trained tokens after truncation (shifted: labels[1:] not ignored); 0: the sample is dropped


def trained_tokens(labels: np.ndarray) -> int:
    """Positions of one sample the shifted LM loss counts (``shift_valid`` for one row)."""
    return int(np.count_nonzero(np.asarray(labels)[1:] != IGNORE_INDEX))


def meta_of(sample: Sample) -> Meta:
    return Meta(len(sample.input_ids), 0 if sample.pixel_values is None else len(sample.pixel_values),
                trained_tokens(sample.labels))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shape of one process's part of a global batch, the same decision on every process."""

    length: int  # longest sample of the global batch (padded up to a bucket by ``collate``)
    images: int  # image slots per process (0: no sample of the global batch has an image)
    image_start: int = 0  # this process's first slot in the global image array


def row_range(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that block ``process_index`` of ``process_count`` builds."""
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def layout_for(metas: list[Meta], process_index: int = 0, process_count: int = 1, image_multiple: int = 1) -> Layout:
    """Pad length from the whole global batch; image slots: the most images any block has, rounded up to a power
    of two (and a multiple of ``image_multiple``, the data shards per block), so every block has the same count."""
    per_block = [sum(m.images for m in metas[slice(*row_range(len(metas), p, process_count))])
                 for p in range(process_count)]
    slots = 0
    if max(per_block) > 0:
        slots = _pow2(max(per_block))
        slots = -(-slots // image_multiple) * image_multiple
    return Layout(max(m.length for m in metas), slots, process_index * slots)


class JsonlEncoder:
    """Record -> Sample with the processor: per-message chat template, images expanded, labels on assistant turns.

    ``sizes``: image sizes and ``VideoInfo`` already read from the headers (``check_images``), so ``measure`` opens
    no file again.
    """

    def __init__(self, processor, max_image_size: int, split_image: bool,
                 sizes: dict[str, tuple[int, int] | VideoInfo] | None = None):
        self.processor = processor
        self.max_image_size = max_image_size
        self.split_image = split_image
        self.sizes = {} if sizes is None else sizes
        tok = processor.tokenizer
        self.header = {r: tok.encode(f"<|im_start|>{r}\n", add_special_tokens=False).ids for r in ("assistant",)}
        self.image_token_id = processor._require_id(processor.image_token)

    def labels(self, piece: np.ndarray, role: str) -> np.ndarray:
        """One message's labels: its tokens on assistant turns (without the role header and image tokens)."""
        lab = np.full_like(piece, IGNORE_INDEX)
        if role == "assistant":
            head = self.header["assistant"]
            start = len(head) if list(piece[: len(head)]) == head else 0
            lab[start:] = piece[start:]
            lab[piece == self.image_token_id] = IGNORE_INDEX
        return lab

    def video_info(self, path: str) -> VideoInfo:
        if path not in self.sizes:
            self.sizes[path] = probe(path)
        return self.sizes[path]

    def frames(self, record: Record) -> tuple[list[dict], list[int]]:
        """A video sample's messages with the video item expanded into its frames, and the frame indices: from
        the header's frame count and rate alone (``measure`` and ``__call__`` alike)."""
        if record.video is None:
            return record.messages, []
        info = self.video_info(record.video.path)
        indices = sample_indices(info.frames, record.video.num_frames)
        items = video_content([i / info.fps for i in indices])
        messages = [{**m, "content": [x for item in m["content"] for x in (
            items if isinstance(item, dict) and item.get("type") == "video" else [item])]}
            if isinstance(m["content"], list) else m for m in record.messages]
        return messages, indices

    def __call__(self, record: Record) -> Sample:
        ids, labels, pixels, masks = [], [], [], []
        messages, indices = self.frames(record)
        if record.video is not None:
            images = iter(load_frames(record.video.path, indices))
        else:
            images = (load_image(path) for path in record.images)
        split = self.split_image and record.video is None  # a video frame is one image
        for message in messages:
            text = self.processor.apply_chat_template([message])
            n_img = image_items([message])
            imgs = [next(images) for _ in range(n_img)]
            enc = self.processor(text=text, images=imgs or None, max_image_size=self.max_image_size,
                                 split_image=split, split_mode="original", add_special_tokens=False)
            piece = enc["input_ids"][0].astype(np.int32)
            ids.append(piece)
            labels.append(self.labels(piece, message["role"]))
            if imgs:
                pixels.append(enc["pixel_values"].astype(np.float32))
                masks.append(enc["pixel_mask"].astype(bool))
        return Sample(np.concatenate(ids), np.concatenate(labels),
                      np.concatenate(pixels) if pixels else None, np.concatenate(masks) if masks else None)

    def size(self, path: str) -> tuple[int, int]:
        if path not in self.sizes:
            self.sizes[path] = image_size(path)
        return self.sizes[path]

    def measure(self, record: Record) -> tuple[np.ndarray, np.ndarray, int]:
        """(input_ids, labels, image crops) of ``self(record)`` from the image files' headers alone: no pixels
        decoded.

        The same chat template, placeholder expansion, tokenizer and label rule as ``__call__``; crop counts from
        the image sizes (``AriaImageProcessor.count_crops``).
        """
        proc = self.processor
        per_image = proc.tokens_per_image(self.max_image_size)
        messages, indices = self.frames(record)
        if record.video is not None:
            info = self.video_info(record.video.path)
            sizes = iter([(info.width, info.height)] * len(indices))
        else:
            sizes = iter(self.size(p) for p in record.images)
        split = self.split_image and record.video is None
        ids, labels, crops = [], [], 0
        for message in messages:
            counts = [proc.image_processor.count_crops(*next(sizes), self.max_image_size, split, "original")
                      for _ in range(image_items([message]))]
            crops += sum(counts)
            text = proc.apply_chat_template([message])
            if text.count(proc.image_token) != len(counts):  # as the processor refuses it in ``__call__``
                raise ValueError(f"the text has {text.count(proc.image_token)} {proc.image_token} placeholder(s) "
                                 f"but {len(counts)} image(s) were given")
            text = proc.expand_image_tokens(text, (c * per_image for c in counts))
            piece = np.asarray(proc.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
            ids.append(piece)
            labels.append(self.labels(piece, message["role"]))
        return np.concatenate(ids), np.concatenate(labels), crops


def truncated_length(input_ids: np.ndarray, max_len: int, image_token_id: int) -> int | None:
    """Tokens kept by ``truncate``, or None when cutting to ``max_len`` would cut (or drop) an image's tokens."""
    if len(input_ids) <= max_len:
        return len(input_ids)
    return None if np.any(input_ids[max_len:] == image_token_id) else max_len


def truncate(sample: Sample, max_len: int, image_token_id: int) -> Sample | None:
    """Cut to ``max_len`` tokens, or None when that would cut (or drop) any image's tokens."""
    n = truncated_length(sample.input_ids, max_len, image_token_id)
    if n is None:
        return None
    if n == len(sample.input_ids):
        return sample
    return dataclasses.replace(sample, input_ids=sample.input_ids[:n], labels=sample.labels[:n])


def _bucket(n: int, multiple: int, cap: int) -> int:
    return min(cap, max(multiple, math.ceil(n / multiple) * multiple))


def collate(samples: list[Sample], pad_id: int, max_len: int, pixel_shape: tuple[int, ...] | None,
            layout: Layout | None = None) -> dict:
    """Right-padded batch (length rounded up to a multiple of 32); images padded to a power-of-two count with
    blank, fully valid images that no placeholder refers to (keeps jit shapes few and gradients finite).

    ``layout`` (multi-host): the global batch's length and this process's image slots instead of the ones of
    ``samples``; ``pixel_shape`` (3, S, S) fills the slots of a process whose rows have no image. With images,
    ``image_offsets`` (B,) gives each row's first slot in the global image array (``merge_image_features``).
    """
    layout = layout or layout_for([meta_of(s) for s in samples])
    t = _bucket(layout.length, 32, max_len)
    b = len(samples)
    batch = {
        "input_ids": np.full((b, t), pad_id, np.int32),
        "attention_mask": np.zeros((b, t), np.int32),
        "labels": np.full((b, t), IGNORE_INDEX, np.int32),
    }
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        batch["input_ids"][i, :n] = s.input_ids
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = s.labels
    if layout.images:
        pix = [s.pixel_values for s in samples if s.pixel_values is not None]
        if pix:
            values = np.concatenate(pix)
            masks = np.concatenate([s.pixel_mask for s in samples if s.pixel_values is not None])
        elif pixel_shape is not None:
            values, masks = np.zeros((0, *pixel_shape), np.float32), np.zeros((0, *pixel_shape[1:]), bool)
        else:
            raise ValueError("collate: this process's rows have no image; pixel_shape is needed for blank slots")
        pad = layout.images - len(values)
        batch["pixel_values"] = np.concatenate([values, np.zeros((pad, *values.shape[1:]), np.float32)])
        batch["pixel_mask"] = np.concatenate([masks, np.ones((pad, *masks.shape[1:]), bool)])
        counts = [meta_of(s).images for s in samples]
        batch["image_offsets"] = (layout.image_start + np.cumsum([0, *counts[:-1]])).astype(np.int32)
    return batch


EVERY_SAMPLE_DROPPED = ("every sample is dropped: max_seq_length cuts through the images of all samples or leaves "
                        "them no assistant token to train on (raise max_seq_length)")


class Loader:
    """Seeded epoch-wise shuffled order over a sample source; its position (``state``) is saved with checkpoints.

    A global batch is the next ``batch_size`` samples of the order that are not dropped (``encode`` returns None
    when truncation would cut an image or leave no trained token, or, with skip_bad_samples on one process, when
    an image fails to decode). With ``process_count`` > 1 this process builds only rows
    ``row_range(batch_size, process_index, process_count)`` of it:

    - Every process walks the same order and decides the same global batch (which samples, in which rows, the
      pad length, the image slots per process) from ``measure(index) -> Meta | None``: the token count after
      truncation and the image count, cheap to get (token ids from image file headers; no pixels). ``measure``
      must agree with ``encode``: a process checks this for each sample it encodes and raises otherwise.
    - Then it encodes only its own rows (images loaded by one process only) and collates them with the shared
      ``Layout``. Nothing here talks to other processes, so the loader cannot deadlock; since every process
      takes identical decisions from identical inputs, ``state`` (the checkpointed position) is the same on all.
    - Without ``measure``, every process encodes the whole global batch and keeps its rows (correct, slower).

    With one process ``measure`` is not used: samples are encoded once, in order, as always.
    """

    def __init__(self, size: int, encode: Callable[[int], Sample | None], batch_size: int, seed: int,
                 collate_fn: Callable[[list[Sample], Layout], dict],
                 measure: Callable[[int], Meta | None] | None = None,
                 process_index: int = 0, process_count: int = 1, image_multiple: int = 1):
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise RecipeError(f"per_device_train_batch_size={batch_size} does not split into {process_count} "
                              "equal blocks of rows, one per process")
        self.size, self.encode, self.batch_size, self.seed = size, encode, batch_size, seed
        self.collate_fn, self.measure = collate_fn, measure
        self.process_index, self.process_count, self.image_multiple = process_index, process_count, image_multiple
        self.state: dict[str, int] = {"epoch": 0, "position": 0, "dropped": 0, "samples": 0}
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._order[1]

    def _compose(self) -> tuple[list[int], list[Meta], dict[int, Sample]]:
        """The next global batch: sample indices and metadata by row, and the samples already encoded by row."""
        lazy = self.measure is not None and self.process_count > 1
        picked: list[int] = []
        metas: list[Meta] = []
        encoded: dict[int, Sample] = {}
        misses = 0
        while len(picked) < self.batch_size:
            if self.state["position"] >= self.size:
                self.state["epoch"] += 1
                self.state["position"] = 0
            index = int(self.order(self.state["epoch"])[self.state["position"]])
            self.state["position"] += 1
            if lazy:
                meta = self.measure(index)
            else:
                sample = self.encode(index)
                meta = None if sample is None else meta_of(sample)
                if sample is not None:
                    encoded[len(picked)] = sample
            if meta is None:
                self.state["dropped"] += 1
                misses += 1
                if misses > 2 * self.size:
                    raise RecipeError(EVERY_SAMPLE_DROPPED)
                continue
            picked.append(index)
            metas.append(meta)
        return picked, metas, encoded

    def next_batch(self) -> dict:
        picked, metas, encoded = self._compose()
        lo, hi = row_range(self.batch_size, self.process_index, self.process_count)
        samples = []
        for row in range(lo, hi):
            sample = encoded[row] if row in encoded else self.encode(picked[row])
            got = None if sample is None else meta_of(sample)
            if got != metas[row]:
                raise RecipeError(f"sample {picked[row]}: measured {metas[row]} but encoded {got}; the processes "
                                  "would disagree on the batch")
            samples.append(sample)
        self.state["samples"] += len(picked)
        layout = layout_for(metas, self.process_index, self.process_count, self.image_multiple)
        return self.collate_fn(samples, layout)

    @property
    def epoch_progress(self) -> float:
        return self.state["epoch"] + self.state["position"] / self.size


def synthetic_source(cfg, n: int, seq_len: int, seed: int) -> Callable[[int], Sample]:
    """Tiny learnable data for the random model: a fixed affine token walk after one image (one batch shape)."""
    vocab = cfg.text.vocab_size
    s = cfg.vision.image_size
    nq = cfg.queries_for_patches((s // cfg.vision.patch_size) ** 2)
    image_id = cfg.image_token_id

    def encode(i: int) -> Sample:
        rng = np.random.default_rng([seed, i])
        ids = np.empty(seq_len, np.int32)
        ids[0] = rng.integers(10, vocab)
        for t in range(1, seq_len):
            ids[t] = 10 + (ids[t - 1] * 7 + 3) % (vocab - 10)
        labels = ids.copy()
        labels[: seq_len // 4] = IGNORE_INDEX
        ids = np.concatenate([np.full(nq, image_id, np.int32), ids])
        labels = np.concatenate([np.full(nq, IGNORE_INDEX, np.int32), labels])
        pixels = rng.standard_normal((1, 3, s, s)).astype(np.float32)
        return Sample(ids, labels, pixels, np.ones((1, s, s), bool))

    return encode


def synthetic_measure(cfg, seq_len: int) -> Callable[[int], Meta]:
    """``meta_of(synthetic_source(...)(i))`` without building the sample."""
    s = cfg.vision.image_size
    meta = Meta(cfg.queries_for_patches((s // cfg.vision.patch_size) ** 2) + seq_len, 1, seq_len - seq_len // 4)
    return lambda i: meta


@dataclasses.dataclass
class BadImages:
    """What to do with a sample whose image or video fails to decode while training (its header was fine, e.g. a
    truncated JPEG): with ``skip`` on one process, drop it (every time the order reaches it) and say so once; else
    stop with a RecipeError naming ``file:line``. Several processes cannot drop it alike: only the one building its
    row decodes the image."""

    skip: bool = False
    processes: int = 1
    log: Callable[[str], None] = print
    bad: set[int] = dataclasses.field(default_factory=set)

    def __call__(self, index: int, record: Record, exc: ImageError | VideoError) -> None:
        if self.skip and self.processes == 1:
            if index not in self.bad:
                self.bad.add(index)
                self.log(f"skip_bad_samples: dropping {record.where} ({exc})")
            return
        if self.processes > 1:
            raise RecipeError(f"{record.where}: {exc}; the file decodes badly although its header is fine, and "
                              "the processes of a multi-host run cannot drop such a sample alike: remove it from "
                              "the dataset")
        raise RecipeError(f"{record.where}: {exc} (set skip_bad_samples: true to leave such samples out)")


def build_source(records: list[Record], encoder: JsonlEncoder, max_len: int, bad_images: BadImages | None = None
                 ) -> Callable[[int], Sample | None]:
    """Sample ``i`` truncated to ``max_len``; None (dropped) when truncation would cut an image or leave no trained
    token, or ``bad_images`` drops it. A sample the processor cannot take is a RecipeError naming its line."""
    bad_images = bad_images or BadImages()

    def encode(i: int) -> Sample | None:
        if i in bad_images.bad:
            return None
        record = records[i]
        try:
            sample = encoder(record)
        except (ImageError, VideoError) as exc:
            bad_images(i, record, exc)
            return None
        except (InputError, ValueError) as exc:  # the chat template or processor refusing this sample's content
            raise RecipeError(f"{record.where}: {one_line(exc)}") from None
        sample = truncate(sample, max_len, encoder.image_token_id)
        return None if sample is None or not trained_tokens(sample.labels) else sample

    return encode


def build_measure(records: list[Record], encoder: JsonlEncoder, max_len: int) -> Callable[[int], Meta | None]:
    """``meta_of(build_source(...)(i))`` (None: dropped) from ``JsonlEncoder.measure``, cached per sample."""
    cache: dict[int, Meta | None] = {}

    def measure(i: int) -> Meta | None:
        if i not in cache:
            try:
                ids, labels, crops = encoder.measure(records[i])
            except (InputError, ValueError) as exc:
                raise RecipeError(f"{records[i].where}: {one_line(exc)}") from None
            n = truncated_length(ids, max_len, encoder.image_token_id)
            trained = 0 if n is None else trained_tokens(labels[:n])
            cache[i] = Meta(n, crops, trained) if trained else None
        return cache[i]

    return measure


def shift_valid(labels: np.ndarray) -> np.ndarray:
    """Which positions count in the shifted LM loss (labels[:, 1:] not ignored)."""
    return labels[:, 1:] != IGNORE_INDEX
