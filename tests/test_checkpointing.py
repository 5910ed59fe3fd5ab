"""Checkpointing with a real CPU Accelerator: atomic save, pruning, round trip, resume resolution, errors,
and the graceful-stop signal handler."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import logging
import signal
import threading
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from latent_dit.checkpointing import (
    TrainState,
    check_same_model,
    install_signal_handlers,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def reset_accelerate_state(fresh_accelerate_state):
    # Accelerator state is a process-wide singleton; each test builds its own (as accelerate's tests do).
    return fresh_accelerate_state


def _build_training(seed: int) -> SimpleNamespace:
    """A tiny model, AdamW and LR scheduler prepared by a CPU Accelerator, with a TrainState registered."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    train_state = TrainState()
    accelerator.register_for_checkpointing(train_state)
    return SimpleNamespace(
        accelerator=accelerator, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, train_state=train_state
    )


def _train_step(training: SimpleNamespace) -> None:
    inputs = torch.arange(6.0).view(2, 3)
    loss = training.model(inputs).pow(2).mean()
    training.accelerator.backward(loss)
    training.optimizer.step()
    training.lr_scheduler.step()
    training.optimizer.zero_grad()
    training.train_state.step += 1
    training.train_state.batch_in_epoch += 1


def _snapshot(training: SimpleNamespace) -> dict:
    model = training.accelerator.unwrap_model(training.model)
    adam_state = training.optimizer.state_dict()["state"][0]
    return {
        "weight": model.weight.detach().clone(),
        "exp_avg": adam_state["exp_avg"].clone(),
        "adam_step": float(adam_state["step"]),
        "lr": training.lr_scheduler.get_last_lr()[0],
        "train_state": training.train_state.state_dict(),
    }


def _names(paths):
    return [path.name for path in paths]


# --- saving and pruning ----------------------------------------------------------------------------------


def test_keep_last_prunes_to_the_newest_checkpoints(tmp_path):
    training = _build_training(seed=0)
    for step in range(1, 5):
        _train_step(training)
        path = save_checkpoint(
            training.accelerator, tmp_path, step, keep_last=2, extra_files={"config.yaml": f"step: {step}\n"}
        )
        assert path == tmp_path / "checkpoints" / f"checkpoint-{step:07d}"

    assert _names(list_checkpoints(tmp_path)) == ["checkpoint-0000003", "checkpoint-0000004"]
    # Nothing else is left behind: no temp folders, no pruned ones.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-0000003", "checkpoint-0000004"]
    latest = tmp_path / "checkpoints" / "checkpoint-0000004"
    assert (latest / "config.yaml").read_text() == "step: 4\n"
    assert (latest / "model.safetensors").is_file() and (latest / "optimizer.bin").is_file()


def test_keep_last_none_keeps_everything_and_steps_sort_numerically(tmp_path):
    training = _build_training(seed=0)
    for step in [9, 10, 100]:
        save_checkpoint(training.accelerator, tmp_path, step, keep_last=None)
    assert _names(list_checkpoints(tmp_path)) == ["checkpoint-0000009", "checkpoint-0000010", "checkpoint-0000100"]


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    training = _build_training(seed=0)
    save_checkpoint(training.accelerator, tmp_path, 5, keep_last=3, extra_files={"config.yaml": "first"})
    save_checkpoint(training.accelerator, tmp_path, 5, keep_last=3, extra_files={"config.yaml": "second"})
    assert _names(list_checkpoints(tmp_path)) == ["checkpoint-0000005"]
    assert (list_checkpoints(tmp_path)[0] / "config.yaml").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-0000005"]


def test_a_crash_during_save_leaves_only_an_ignored_temp_folder(tmp_path, monkeypatch):
    training = _build_training(seed=0)
    save_checkpoint(training.accelerator, tmp_path, 1, keep_last=None)

    real_save_state = training.accelerator.save_state

    def crashing_save_state(output_dir):
        real_save_state(output_dir)  # files half written ...
        raise OSError("disk full")  # ... and then the process dies

    monkeypatch.setattr(training.accelerator, "save_state", crashing_save_state)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(training.accelerator, tmp_path, 2, keep_last=None)

    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-0000001", "checkpoint-0000002.tmp-incomplete"]
    assert _names(list_checkpoints(tmp_path)) == ["checkpoint-0000001"]
    assert resolve_resume(tmp_path, "latest") == checkpoints / "checkpoint-0000001"

    monkeypatch.setattr(training.accelerator, "save_state", real_save_state)
    save_checkpoint(training.accelerator, tmp_path, 3, keep_last=None)  # cleans the leftover up
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-0000001", "checkpoint-0000003"]


def test_a_leftover_temp_folder_is_ignored(tmp_path):
    training = _build_training(seed=0)
    save_checkpoint(training.accelerator, tmp_path, 1, keep_last=None)
    leftover = tmp_path / "checkpoints" / "checkpoint-0000007.tmp-incomplete"
    leftover.mkdir()
    (leftover / "random_states_0.pkl").write_bytes(b"")
    assert _names(list_checkpoints(tmp_path)) == ["checkpoint-0000001"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-0000001"
    with pytest.raises(ValueError, match="unfinished save"):
        resolve_resume(tmp_path, str(leftover))


def test_bad_save_arguments_raise(tmp_path):
    training = _build_training(seed=0)
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(training.accelerator, tmp_path, 1, keep_last=0)
    with pytest.raises(ValueError, match="'sub/config.yaml'"):
        save_checkpoint(training.accelerator, tmp_path, 1, keep_last=None, extra_files={"sub/config.yaml": ""})
    assert list_checkpoints(tmp_path) == []


# --- loading ---------------------------------------------------------------------------------------------


def test_load_restores_weights_optimizer_scheduler_train_state_and_rng(tmp_path, reset_accelerate_state):
    training = _build_training(seed=0)
    for _ in range(3):
        _train_step(training)
    training.train_state.epoch = 2
    path = save_checkpoint(training.accelerator, tmp_path, training.train_state.step, keep_last=None)
    saved = _snapshot(training)
    random_after_save = torch.rand(4)

    # A fresh "process": new state singleton, differently initialised model, untouched optimizer.
    reset_accelerate_state()
    resumed = _build_training(seed=123)
    assert not torch.equal(resumed.accelerator.unwrap_model(resumed.model).weight, saved["weight"])
    assert resumed.optimizer.state_dict()["state"] == {}
    load_checkpoint(resumed.accelerator, resolve_resume(tmp_path, "latest"))

    restored = _snapshot(resumed)
    torch.testing.assert_close(restored["weight"], saved["weight"], rtol=0, atol=0)
    torch.testing.assert_close(restored["exp_avg"], saved["exp_avg"], rtol=0, atol=0)
    assert restored["adam_step"] == saved["adam_step"] == 3.0
    assert restored["lr"] == saved["lr"] == pytest.approx(0.1 * 0.5**3)
    assert restored["train_state"] == saved["train_state"]
    assert (resumed.train_state.step, resumed.train_state.epoch, resumed.train_state.batch_in_epoch) == (3, 2, 3)
    assert path.name == "checkpoint-0000003"
    # The RNG continues exactly where it was at save time.
    torch.testing.assert_close(torch.rand(4), random_after_save, rtol=0, atol=0)

    # And training carries on identically from there.
    _train_step(training)
    _train_step(resumed)
    torch.testing.assert_close(_snapshot(resumed)["weight"], _snapshot(training)["weight"], rtol=0, atol=0)


def test_load_of_a_corrupt_checkpoint_names_the_folder(tmp_path):
    training = _build_training(seed=0)
    path = save_checkpoint(training.accelerator, tmp_path, 1, keep_last=None)
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="checkpoint-0000001") as error:
        load_checkpoint(training.accelerator, path)
    assert "model.safetensors" in str(error.value)


def test_load_of_a_missing_file_names_the_folder(tmp_path):
    training = _build_training(seed=0)
    path = save_checkpoint(training.accelerator, tmp_path, 1, keep_last=None)
    (path / "custom_checkpoint_0.pkl").unlink()  # the TrainState
    with pytest.raises(RuntimeError, match="checkpoint-0000001"):
        load_checkpoint(training.accelerator, path)
    with pytest.raises(FileNotFoundError, match="checkpoint-0000042"):
        load_checkpoint(training.accelerator, tmp_path / "checkpoints" / "checkpoint-0000042")


def test_same_model_check_accepts_wrapped_keys_and_names_what_differs(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    folder = tmp_path / "checkpoint-0000001"
    folder.mkdir()
    # as accelerate saves a torch.compile'd model under DDP: the wrappers' prefixes on every key
    save_file({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, folder / "model.safetensors")
    check_same_model(folder, model)

    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Identity())
    with pytest.raises(ValueError, match="checkpoint-0000001 holds a different model") as error:
        check_same_model(folder, other, hint="Its config.yaml has other model settings: add --set model.depth=3.")
    message = str(error.value)
    assert "2 weights this model lacks, e.g. 1.bias" in message and "2 of another shape, e.g. 0.bias" in message
    assert "--set model.depth=3" in message

    (folder / "model.safetensors").write_bytes(b"truncated")
    check_same_model(folder, other)  # unreadable: left to load_checkpoint, whose error names the folder


# --- resolving --resume ----------------------------------------------------------------------------------


def test_resolve_resume_without_checkpoints(tmp_path, caplog):
    assert resolve_resume(tmp_path, None) is None
    with caplog.at_level(logging.INFO, logger="latent_dit.checkpointing"):
        assert resolve_resume(tmp_path, "latest") is None
    assert "starting fresh" in caplog.text


def test_resolve_resume_accepts_a_path_or_a_name(tmp_path):
    training = _build_training(seed=0)
    path = save_checkpoint(training.accelerator, tmp_path, 12, keep_last=None)
    assert resolve_resume(tmp_path, str(path)) == path
    assert resolve_resume(tmp_path, "checkpoint-0000012") == path


def test_resolve_resume_errors_name_the_path_and_what_exists(tmp_path):
    training = _build_training(seed=0)
    save_checkpoint(training.accelerator, tmp_path, 12, keep_last=None)

    missing = tmp_path / "checkpoints" / "checkpoint-0000099"
    with pytest.raises(FileNotFoundError) as error:
        resolve_resume(tmp_path, str(missing))
    assert str(missing) in str(error.value) and "checkpoint-0000012" in str(error.value)

    not_a_checkpoint = tmp_path / "some_folder"
    not_a_checkpoint.mkdir()
    with pytest.raises(ValueError) as error:
        resolve_resume(tmp_path, str(not_a_checkpoint))
    assert str(not_a_checkpoint) in str(error.value) and "checkpoint-0000012" in str(error.value)


def test_train_state_round_trips_through_its_state_dict():
    state = TrainState()
    for field_number, field in enumerate(dataclasses.fields(state)):  # every field, including any added later
        setattr(state, field.name, 10 + field_number)
    other = TrainState()
    other.load_state_dict(state.state_dict())
    assert other == state


# --- signals ---------------------------------------------------------------------------------------------


def test_sigterm_sets_the_stop_flag_and_restore_puts_handlers_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = install_signal_handlers()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_sigint_raises_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    stop = install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == before  # already restored by the second signal
    finally:
        stop.restore()


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("stop", install_signal_handlers()))
    thread.start()
    thread.join()
    assert result["stop"].requested is False
    assert signal.getsignal(signal.SIGTERM) == before
