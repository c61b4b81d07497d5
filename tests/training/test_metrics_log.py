"""aria_jax/training/metrics_log.py: metrics.jsonl and the TensorBoard events, and what a full disk does to them."""

from __future__ import annotations

import errno
import os
import struct
import threading

import pytest

from aria_jax.training.metrics_log import MetricsLog, TensorBoardEvents


def read_events(directory) -> list:
    """Every Event in the event files of ``directory``, parsed from TFRecord framing (length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (size,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + size]))
            at += 12 + size + 4
    return events


def scalars(events) -> dict[int, dict[str, float]]:
    return {e.step: {v.tag: v.simple_value for v in e.summary.value} for e in events if e.summary.value}


def test_every_record_is_on_disk_as_events_when_write_returns(tmp_path):
    threads = threading.active_count()
    log = MetricsLog(str(tmp_path), None)
    log.write({"step": 1, "loss": 2.5, "learning_rate": 1e-4, "skipped": True})
    log.write({"step": 2, "loss": 2.25, "eval_loss": 3.0})
    assert threading.active_count() == threads  # written in this thread: nothing left to flush at exit
    got = scalars(read_events(tmp_path / "tensorboard"))  # before close
    assert got == {1: {"train/loss": 2.5, "train/learning_rate": pytest.approx(1e-4)},
                   2: {"train/loss": 2.25, "eval/loss": 3.0}}
    log.close()
    assert read_events(tmp_path / "tensorboard")[0].file_version == "brain.Event:2"


def failing_flush(monkeypatch, after: int):
    """EventsWriter.flush fails as a full disk does (an OSError naming no file) from its ``after``-th call on."""
    from tensorboardX.event_file_writer import EventsWriter

    calls = []
    real = EventsWriter.flush

    def flush(self):
        calls.append(1)
        if len(calls) >= after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self)

    monkeypatch.setattr(EventsWriter, "flush", flush)


def test_a_failed_write_or_close_names_the_events_directory(tmp_path, monkeypatch):
    failing_flush(monkeypatch, after=3)  # the file's header, step 1; step 2 fails
    log = MetricsLog(str(tmp_path), None)
    log.write({"step": 1, "loss": 1.0})
    with pytest.raises(OSError) as raised:
        log.write({"step": 2, "loss": 1.0})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "tensorboard")
    with pytest.raises(OSError) as raised:
        TensorBoardEvents(str(tmp_path / "other")).close()
    assert raised.value.filename == str(tmp_path / "other")


def test_a_quiet_close_drops_the_events_error(tmp_path, monkeypatch):
    log = MetricsLog(str(tmp_path), None)
    log.write({"step": 1, "loss": 1.0})
    failing_flush(monkeypatch, after=1)
    log.close(quietly=True)
    assert log.tb is None
