"""The TensorBoard writer: what it writes is read back from the event files themselves."""

import io
import json
import pathlib
import struct
import types

import jax
import ml_collections
import numpy as np
import pytest
from helpers import run_steps, smoke_config
from PIL import Image
from tensorboardX.proto import event_pb2

from nbjax.config import base_config
from nbjax.pruning import masks as masks_lib
from nbjax.train import loop
from nbjax.train import tensorboard as tb


def read_events(logdir):
    """Every Event of every event file in ``logdir``, parsed from the TFRecord framing
    (u64 length, u32 crc, payload, u32 crc) with tensorboardX's own proto."""
    events = []
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            payload = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            events.append(event_pb2.Event.FromString(payload))
    return events


def summaries(logdir):
    """``{tag: [(step, Summary.Value), ...]}`` of every summary value written."""
    out = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value))
    return out


def test_scalars_writes_every_numeric_scalar_and_skips_the_rest(tmp_path):
    record = {"step": 5, "train/loss": np.float32(0.5), "train/accuracy": 0.25,
              "pruning/num_updates": np.int32(3), "burden/load/block_0": np.array(1.5),
              "final": True, "name": "gmp", "per_class": np.array([1.0, 2.0])}
    with tb.TensorBoardWriter(tmp_path) as writer:
        tags = writer.scalars(16, record)
    expected = {"train/loss": 0.5, "train/accuracy": 0.25, "pruning/num_updates": 3.0,
                "burden/load/block_0": 1.5}
    assert sorted(tags) == sorted(expected)
    got = summaries(tmp_path)
    assert {tag: [(s, v.simple_value) for s, v in values] for tag, values in got.items()} == {
        tag: [(16, value)] for tag, value in expected.items()}


def test_mask_histograms_hold_the_kept_magnitudes_of_each_block(tmp_path):
    params = {"patch_embed": {"kernel": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)},
              "block_0": {"fc1": {"kernel": np.array([[1.0, -2.0], [3.0, -4.0]], np.float32),
                                  "bias": np.array([9.0, 9.0], np.float32)},
                          "attn": {"query": {"kernel": np.array([-5.0, 6.0], np.float32)}}},
              "head": {"kernel": np.array([[7.0]], np.float32)}}
    masks = {"patch_embed": {"kernel": np.array([[True, False], [True, True]])},
             "block_0": {"fc1": {"kernel": np.array([[False, True], [True, False]])},
                         "attn": {"query": {"kernel": np.array([True, False])}}}}
    with tb.TensorBoardWriter(tmp_path) as writer:
        writer.mask_histograms(40, params, masks)
    got = summaries(tmp_path)
    assert sorted(got) == ["kept_weights/block_0", "kept_weights/patch_embed"]
    # block_0 keeps |-2|, |3| (fc1) and |-5| (query); patch_embed keeps 0.5, 2, 0.25.
    for tag, kept in (("kept_weights/block_0", [2.0, 3.0, 5.0]),
                      ("kept_weights/patch_embed", [0.5, 2.0, 0.25])):
        (step, value), = got[tag]
        histo = value.histo
        assert step == 40
        assert (histo.num, histo.min, histo.max) == (len(kept), min(kept), max(kept))
        assert histo.sum == pytest.approx(sum(kept))
        assert histo.sum_squares == pytest.approx(sum(k * k for k in kept))
        assert sum(histo.bucket) == len(kept)


def test_image_from_png_path_keeps_the_pixels_and_from_array_its_size(tmp_path):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
    png = tmp_path / "pic.png"
    Image.fromarray(pixels).save(png)
    logdir = tmp_path / "run"
    with tb.TensorBoardWriter(logdir) as writer:
        writer.image("merges/png", 3, png)
        writer.image("merges/array", 4, np.full((5, 7), 0.5, np.float32))
    got = summaries(logdir)
    (step, value), = got["merges/png"]
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    assert step == 3 and (value.image.height, value.image.width) == (4, 6)
    np.testing.assert_array_equal(decoded[..., :3], pixels)
    (step, value), = got["merges/array"]
    assert step == 4 and (value.image.height, value.image.width) == (5, 7)


def test_disabled_writer_creates_no_files(tmp_path):
    config = ml_collections.ConfigDict({"train": {"tensorboard": False}})
    writer = tb.make_writer(config, tmp_path / "off")
    assert not writer.enabled
    writer.scalars(1, {"train/loss": 1.0})
    writer.mask_histograms(1, {"k": np.ones(2)}, {"k": np.ones(2, bool)})
    writer.image("x", 1, np.zeros((2, 2)))
    writer.close()
    assert not (tmp_path / "off").exists()
    assert tb.make_writer(smoke_config(), tmp_path / "on", enabled=False).enabled is False


def test_masks_updated_since_reads_the_last_update_step():
    # Steps 8..15 were taken since the log at step 8; an update at step index 8 is new.
    assert tb.masks_updated_since({"pruning/last_update": np.int32(8)}, 8)
    assert tb.masks_updated_since({"pruning/last_update": 15}, 8)
    assert not tb.masks_updated_since({"pruning/last_update": 7}, 8)
    assert not tb.masks_updated_since({"pruning/last_update": -1}, 0)
    assert not tb.masks_updated_since({"train/loss": 1.0}, 0)  # a dense run logs no updates


def test_log_writes_histograms_only_after_a_mask_update(tmp_path):
    state = types.SimpleNamespace(params={"block_0": {"kernel": np.array([1.0, -2.0])}},
                                  masks={"block_0": {"kernel": np.array([True, False])}})
    with tb.TensorBoardWriter(tmp_path, start_step=8) as writer:
        for step, last_update in ((16, 7), (24, 23), (32, 23), (40, 39)):
            writer.log(step, {"train/loss": 1.0, "pruning/last_update": last_update}, state)
        writer.log(40, {"test/accuracy": 0.5})  # the final record: no state, no histogram
    got = summaries(tmp_path)
    # The log at step S covers the step indices from the previous log's S to S - 1: the
    # update at index 7 came before the resume at 8, the one at 23 is new at 24 only.
    assert [s for s, _ in got["kept_weights/block_0"]] == [24, 40]
    assert [s for s, _ in got["train/loss"]] == [16, 24, 32, 40]
    assert [s for s, _ in got["test/accuracy"]] == [40]


def test_resumed_writer_hides_the_first_attempts_events_past_the_resume_step(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing."
                                            "event_accumulator")
    with tb.TensorBoardWriter(tmp_path) as first:
        for step in (8, 16, 24):
            first.scalars(step, {"train/loss": float(step)})
    with tb.make_writer(smoke_config(), tmp_path, start_step=16) as resumed:
        for step in (16, 24):
            resumed.scalars(step, {"train/loss": step + 0.5})
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (8, 8.0), (16, 16.5), (24, 24.5)]


def test_a_smoke_runs_record_and_state_are_written_whole(tmp_path):
    run, state, history = run_steps(smoke_config(**{"pruning.method": "gmp"}), 4)
    record = {k: np.asarray(v)[-1] for k, v in history[-1].items()}
    numeric = [k for k, v in record.items() if np.asarray(v).size == 1]
    with tb.TensorBoardWriter(tmp_path) as writer:
        assert sorted(writer.scalars(16, record)) == sorted(numeric)
        writer.mask_histograms(16, state.params, state.masks)
    got = summaries(tmp_path)
    assert {"train/loss", "train/learning_rate", "pruning/sparsity", "burden/index"} <= set(got)
    masks = masks_lib.flatten(jax.device_get(state.masks))
    assert float(record["pruning/sparsity"]) > 0  # the histograms below see a pruned net
    for block in ("patch_embed", "block_0", "block_1"):
        kept = sum(int(m.sum()) for p, m in masks.items() if p.split("/")[0] == block)
        assert got[f"kept_weights/{block}"][0][1].histo.num == kept


# The loop's writer is switched by train.tensorboard; until that key exists it writes nothing.
needs_loop_writer = pytest.mark.skipif(
    "tensorboard" not in base_config().train,
    reason="no train.tensorboard key yet: the train loop writes no event files")


@needs_loop_writer
def test_a_training_run_writes_its_log_records_and_histograms(tmp_path):
    final = loop.train_and_evaluate(smoke_config(**{"pruning.method": "gmp",
                                                    "train.num_steps": 16}), str(tmp_path))
    got = summaries(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "train/loss" in r]
    assert [(s, v.simple_value) for s, v in got["train/loss"]] == [
        (r["step"], np.float32(r["train/loss"])) for r in records]
    assert [(s, v.simple_value) for s, v in got["test/accuracy"]] == [
        (16, np.float32(final["test/accuracy"]))]
    # A log step shows the histograms when a mask update happened since the previous log.
    previous, updated = 0, []
    for r in records:
        if r["pruning/last_update"] >= previous:
            updated.append(r["step"])
        previous = r["step"]
    assert updated and [s for s, _ in got["kept_weights/block_0"]] == updated


@needs_loop_writer
def test_a_run_with_tensorboard_off_writes_no_event_files(tmp_path):
    config = smoke_config(**{"train.num_steps": 8, "train.tensorboard": False})
    loop.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "metrics.jsonl").exists()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
