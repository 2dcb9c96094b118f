"""Timestamp: counters, wall clock, state dicts that load under weights_only=True, and time strings."""

from __future__ import annotations

import io
import re
import time

import pytest
import torch

from fabric_ckpt.core.timestamp import TIMESTAMP_FIELDS, Time, Timestamp, TimeUnit, parse_time


@pytest.mark.parametrize(
    "value, expected",
    [
        ("10ep", Time(10, TimeUnit.EPOCH)),
        ("500ba", Time(500, TimeUnit.BATCH)),
        ("2000sp", Time(2000, TimeUnit.SAMPLE)),
        ("1000000tok", Time(1_000_000, TimeUnit.TOKEN)),
        (3, Time(3, TimeUnit.EPOCH)),
        (Time(7, TimeUnit.BATCH), Time(7, TimeUnit.BATCH)),
    ],
)
def test_parse_time(value, expected):
    assert parse_time(value) == expected


def test_time_prints_as_its_time_string():
    assert str(parse_time("500ba")) == "500ba" and str(parse_time(2)) == "2ep"


@pytest.mark.parametrize("value", ["0ep", "-3ba", 0, -1, "0tok", Time(0, TimeUnit.BATCH)])
def test_zero_and_negative_times_are_rejected(value):
    with pytest.raises(ValueError, match=f"^{re.escape(f'save_interval={value!r} must be positive')}$"):
        parse_time(value, name="save_interval")


@pytest.mark.parametrize("value", ["", "10", "10 ep", "1.5ep", "ep", "10min", "10EP", True, 1.5, None])
def test_malformed_times_are_rejected_naming_the_value(value):
    message = (
        f"time={value!r} is not a duration: use a positive int (epochs) or a string such as "
        "'10ep', '500ba', '2000sp' or '1000000tok'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_time(value)


def test_epochs_count_from_zero_and_in_epoch_counters_reset():
    timestamp = Timestamp()
    for _ in range(3):
        timestamp.advance_batch(samples=8, tokens=100)
    assert (timestamp.epoch, timestamp.batch, timestamp.batch_in_epoch) == (0, 3, 3)
    assert (timestamp.sample, timestamp.sample_in_epoch, timestamp.token, timestamp.token_in_epoch) == (
        24,
        24,
        300,
        300,
    )
    timestamp.advance_epoch()
    assert (timestamp.epoch, timestamp.batch, timestamp.batch_in_epoch) == (1, 3, 0)
    assert (timestamp.sample, timestamp.sample_in_epoch, timestamp.token, timestamp.token_in_epoch) == (24, 0, 300, 0)
    timestamp.advance_batch(samples=2)
    assert (timestamp.batch, timestamp.batch_in_epoch, timestamp.sample, timestamp.sample_in_epoch) == (4, 1, 26, 2)
    assert [timestamp.get(unit) for unit in ("ep", "ba", "sp", "tok")] == [1, 4, 26, 300]


def test_wall_clock_measures_batches_epochs_and_the_total():
    timestamp = Timestamp()
    time.sleep(0.02)
    timestamp.advance_batch()
    first = timestamp.batch_wct
    assert first >= 0.02 and timestamp.epoch_wct == first and timestamp.total_wct == first
    timestamp.advance_batch()
    assert timestamp.epoch_wct == first + timestamp.batch_wct and timestamp.total_wct == timestamp.epoch_wct
    time.sleep(0.01)
    before = timestamp.total_wct
    timestamp.advance_epoch()
    assert timestamp.epoch_wct == 0.0 and timestamp.total_wct >= before + 0.01


@pytest.mark.parametrize("samples, tokens", [(-1, 0), (0, -5), (1.5, 0), (True, 0)])
def test_advance_rejects_bad_counts(samples, tokens):
    name, value = ("samples", samples) if samples != 0 else ("tokens", tokens)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{name}={value!r} must be a non-negative int')}$"):
        Timestamp().advance_batch(samples, tokens)


def test_crossed_detects_multiples_passed_by_the_last_advance():
    timestamp = Timestamp()
    every_ten_samples = parse_time("10sp")
    crossings = []
    for _ in range(8):
        timestamp.advance_batch(samples=4)  # 4, 8, 12, ..., 32: passes 10 at 12, 20 at 20, 30 at 32
        crossings.append(timestamp.crossed(every_ten_samples))
    assert crossings == [False, False, True, False, True, False, False, True]
    assert not timestamp.crossed(parse_time("1ep"))
    timestamp.advance_epoch()
    assert timestamp.crossed(parse_time("1ep")) and not timestamp.crossed(parse_time("1ba"))


def test_state_dict_round_trips_through_weights_only_torch_load():
    timestamp = Timestamp()
    for _ in range(5):
        timestamp.advance_batch(samples=3, tokens=7)
    timestamp.advance_epoch()
    buffer = io.BytesIO()
    torch.save(timestamp.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert list(state) == list(TIMESTAMP_FIELDS)
    restored = Timestamp()
    restored.load_state_dict(state)
    assert restored == timestamp
    assert all(type(value) in (int, float) for value in state.values())


def test_a_loaded_timestamp_has_not_crossed_anything():
    timestamp = Timestamp()
    timestamp.load_state_dict(Timestamp(epoch=3, batch=30, sample=300).state_dict())
    assert not timestamp.crossed(parse_time("1ba")) and not timestamp.crossed(parse_time("1ep"))
    timestamp.advance_batch(samples=10)
    assert timestamp.crossed(parse_time("1ba")) and timestamp.crossed(parse_time("310sp"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda state: state.pop("epoch"),
            "a Timestamp state dict has missing keys ['epoch'] and unknown keys []",
        ),
        (
            lambda state: state.update(extra=1),
            "a Timestamp state dict has missing keys [] and unknown keys ['extra']",
        ),
        (lambda state: state.update(batch=-1), "Timestamp field 'batch' must be a non-negative int, got -1"),
        (lambda state: state.update(batch=2.0), "Timestamp field 'batch' must be a non-negative int, got 2.0"),
        (lambda state: state.update(batch=True), "Timestamp field 'batch' must be a non-negative int, got True"),
        (
            lambda state: state.update(total_wct="1"),
            "Timestamp field 'total_wct' must be a non-negative float, got '1'",
        ),
    ],
)
def test_bad_state_dicts_are_rejected_and_change_nothing(edit, message):
    timestamp = Timestamp(epoch=1, batch=2)
    state = Timestamp(epoch=5, batch=50).state_dict()
    edit(state)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        timestamp.load_state_dict(state)
    assert (timestamp.epoch, timestamp.batch) == (1, 2)
