"""CheckpointManager(save_on_signal=...) in this process: real signals sent to it at chosen moments.

The handler only records; the next hook saves synchronously, moves ``latest``, sets ``should_stop`` and puts the
previous handler back. The multi-process behaviour (agreement, lost ranks) is in test_preemption.py.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings

import pytest
import torch

from fabric_ckpt.manager import CheckpointManager

SIGTERM = signal.SIGTERM


@pytest.fixture(autouse=True)
def _handlers_restored():
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


class Recorder:
    """A handler a program installed before the manager."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, number: int, frame) -> None:
        self.calls.append(number)


class SignalDuringSave:
    """A stateful entry that sends this process ``number`` while a checkpoint is being built (``armed`` times)."""

    def __init__(self, number: int = SIGTERM) -> None:
        self.number = number
        self.armed = 0

    def state_dict(self) -> dict:
        if self.armed:
            self.armed -= 1
            os.kill(os.getpid(), self.number)
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make(fabric, folder, **kwargs) -> tuple[CheckpointManager, dict]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    manager = CheckpointManager(fabric, folder, filename="ba{batch}", latest_filename="latest", **kwargs)
    return manager, state


def latest(folder) -> str:
    return os.readlink(os.path.join(folder, "latest"))


def test_off_by_default_no_handler_changes(fabric, tmp_path):
    before = signal.getsignal(SIGTERM)
    manager, state = make(fabric, tmp_path)
    CheckpointManager(fabric, tmp_path / "b", save_on_signal=())
    assert signal.getsignal(SIGTERM) is before
    manager.on_batch_end(state)
    assert not manager.should_stop


def test_a_signal_saves_at_the_next_batch_end_stops_and_puts_the_previous_handler_back(fabric, tmp_path):
    previous = Recorder()
    signal.signal(SIGTERM, previous)
    manager, state = make(fabric, tmp_path, save_interval="100ba", save_on_signal=(SIGTERM,))
    assert signal.getsignal(SIGTERM) is not previous
    for _ in range(3):
        assert manager.on_batch_end(state) is None
    os.kill(os.getpid(), SIGTERM)  # mid-step: only recorded
    assert previous.calls == [SIGTERM] and not manager.should_stop and os.listdir(tmp_path) == []
    path = manager.on_batch_end(state)
    assert path == str(tmp_path / "ba4") and manager.should_stop
    assert latest(tmp_path) == "ba4"
    assert fabric.load(path)["timestamp"]["batch"] == 4
    assert signal.getsignal(SIGTERM) is previous

    # Later hooks save nothing; a later signal reaches only the handler that is back in place.
    os.kill(os.getpid(), SIGTERM)
    assert manager.on_batch_end(state) is None and manager.on_epoch_end(state) is None
    assert sorted(os.listdir(tmp_path)) == ["ba4", "latest"] and previous.calls == [SIGTERM, SIGTERM]


def test_on_epoch_end_honours_a_signal_too(fabric, tmp_path):
    manager, state = make(fabric, tmp_path, save_interval="100ba", save_on_signal=("SIGUSR1",))
    manager.on_batch_end(state)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert manager.on_epoch_end(state) == str(tmp_path / "ba1") and manager.should_stop
    assert fabric.load(tmp_path / "ba1")["timestamp"]["epoch"] == 1


def test_the_default_disposition_is_not_called_and_comes_back(fabric, tmp_path):
    signal.signal(SIGTERM, signal.SIG_DFL)
    manager, state = make(fabric, tmp_path, save_on_signal=(SIGTERM,))
    os.kill(os.getpid(), SIGTERM)  # would end this test process if the default action ran
    manager.on_batch_end(state)
    assert manager.should_stop and signal.getsignal(SIGTERM) is signal.SIG_DFL


def test_sigint_saves_instead_of_raising_keyboard_interrupt(fabric, tmp_path):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    manager, state = make(fabric, tmp_path, save_on_signal=(signal.SIGINT,))
    os.kill(os.getpid(), signal.SIGINT)
    assert manager.on_batch_end(state) == str(tmp_path / "ba1")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_during_a_save_is_honoured_after_that_save_commits(fabric, tmp_path):
    manager, state = make(fabric, tmp_path, save_interval="2ba", save_on_signal=(SIGTERM,))
    sender = SignalDuringSave()
    state["sender"] = sender
    manager.on_batch_end(state)
    sender.armed = 1
    assert manager.on_batch_end(state) == str(tmp_path / "ba2")  # the save the signal interrupted, complete
    assert not manager.should_stop and latest(tmp_path) == "ba2"
    assert manager.on_batch_end(state) == str(tmp_path / "ba3") and manager.should_stop
    assert latest(tmp_path) == "ba3"


def test_a_second_signal_starts_no_second_save(fabric, tmp_path):
    manager, state = make(fabric, tmp_path, save_interval="100ba", save_on_signal=(SIGTERM,))
    sender = SignalDuringSave()
    state["sender"] = sender
    os.kill(os.getpid(), SIGTERM)
    sender.armed = 1  # the second signal arrives while the final checkpoint is written
    assert manager.on_batch_end(state) == str(tmp_path / "ba1") and manager.should_stop
    assert manager.on_batch_end(state) is None
    assert sorted(os.listdir(tmp_path)) == ["ba1", "latest"]


def test_an_asynchronous_save_in_flight_is_finished_first(fabric, tmp_path):
    manager, state = make(fabric, tmp_path, save_interval="2ba", async_save=True, save_on_signal=(SIGTERM,))
    manager.on_batch_end(state)
    manager.on_batch_end(state)  # ba2 goes to the background
    in_flight = manager.last_save
    os.kill(os.getpid(), SIGTERM)
    assert manager.on_batch_end(state) == str(tmp_path / "ba3")
    assert in_flight is not None and in_flight.done() and in_flight.exception() is None
    assert manager.should_stop and latest(tmp_path) == "ba3"
    assert fabric.load(tmp_path / "ba2")["timestamp"]["batch"] == 2  # written synchronously: complete on return
    assert manager.last_save is in_flight  # the final save did not go to the background


def test_a_failed_asynchronous_save_does_not_stop_the_final_one(fabric, tmp_path):
    manager, state = make(fabric, tmp_path, save_interval="1ba", async_save=True, save_on_signal=(SIGTERM,))
    blocker = tmp_path / "ba1"
    blocker.mkdir()  # a folder where the checkpoint file must go: the background write fails
    (blocker / "keep").write_text("x")
    manager.overwrite = True
    manager.on_batch_end(state)
    os.kill(os.getpid(), SIGTERM)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert manager.on_batch_end(state) == str(tmp_path / "ba2")
    assert any("saving this step's checkpoint anyway" in str(w.message) for w in caught)
    assert manager.should_stop and latest(tmp_path) == "ba2"


def test_close_puts_the_handlers_back(fabric, tmp_path):
    previous = Recorder()
    signal.signal(SIGTERM, previous)
    manager, _ = make(fabric, tmp_path, save_on_signal=(SIGTERM,))
    manager.close()
    assert signal.getsignal(SIGTERM) is previous
    manager.close()  # twice is fine


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"save_on_signal": (signal.SIGKILL,)}, "save_on_signal: SIGKILL cannot be caught"),
        ({"save_on_signal": ("SIGNOPE",)}, r"save_on_signal: 'SIGNOPE' is not a signal of this platform"),
        ({"save_on_signal": signal.SIGTERM}, r"save_on_signal=<Signals.SIGTERM: 15> must be a tuple of signals"),
        ({"save_on_signal": (SIGTERM,), "signal_timeout": 0}, r"signal_timeout=0 must be a positive number"),
        ({"save_on_signal": (SIGTERM,), "filename": "x", "latest_filename": "x"}, "names the checkpoints themselves"),
    ],
)
def test_bad_options_are_refused_and_install_nothing(fabric, tmp_path, options, message):
    before = signal.getsignal(SIGTERM)
    with pytest.raises(ValueError, match=message):
        CheckpointManager(fabric, tmp_path, **options)
    assert signal.getsignal(SIGTERM) is before


def test_a_manager_watching_signals_must_be_made_in_the_main_thread(fabric, tmp_path):
    errors = []

    def make_in_thread() -> None:
        try:
            CheckpointManager(fabric, tmp_path, save_on_signal=(SIGTERM,))
        except ValueError as err:
            errors.append(str(err))

    thread = threading.Thread(target=make_in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "must be made in the main thread" in errors[0]
