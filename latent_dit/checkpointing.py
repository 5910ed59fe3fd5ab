"""Checkpoints that survive crashes and pre-emption: atomic save, pruning, resume, and a graceful stop on signals.

A checkpoint is one ``accelerator.save_state`` folder (model, optimizer, LR scheduler, RNG states and every
object registered with ``accelerator.register_for_checkpointing``: the EMA model, ``TrainState``) plus any
extra text files such as the resolved ``config.yaml``. They live in ``<output_dir>/checkpoints/`` as
``checkpoint-<step:07d>``.

Atomicity: a checkpoint is written into ``checkpoint-<step>.tmp-incomplete`` and renamed to its final
name only once every process has finished writing. A rename within one folder is atomic, so a crash at any
moment leaves either a complete ``checkpoint-<step>`` or an ignored ``*.tmp-*`` folder, which the next save
deletes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# Every unfinished or superseded folder carries this in its name; nothing with it is ever loaded.
_TEMP_MARKER = ".tmp-"
# accelerate's save_state always writes one RNG file per process (random_states_<rank>.pkl).
_RNG_STATE_GLOB = "random_states_*.pkl"


@dataclass
class TrainState:
    """Where training stands; registered with ``accelerator.register_for_checkpointing`` so it is saved
    and restored with the rest of the state."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # passes over the data started
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (to skip them on resume)
    micro_step: int = 0  # batches consumed in the whole run; seeds each micro-step's random draws

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        for field in fields(self):
            setattr(self, field.name, int(state_dict[field.name]))


# --- finding checkpoints ---------------------------------------------------------------------------------


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    # Zero-padded so the folders also sort by step in `ls`.
    return checkpoints_dir(output_dir) / f"checkpoint-{step:07d}"


def _is_complete_checkpoint(path: Path) -> bool:
    return (
        path.is_dir()
        and _TEMP_MARKER not in path.name
        and any(path.glob(_RNG_STATE_GLOB))
    )


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``<output_dir>/checkpoints``, oldest step first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and _is_complete_checkpoint(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _describe_available(output_dir: str | Path) -> str:
    names = [path.name for path in list_checkpoints(output_dir)]
    where = checkpoints_dir(output_dir)
    return f"complete checkpoints in {where}: {names}" if names else f"there are no complete checkpoints in {where}"


def resolve_resume(output_dir: str | Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    ``resume``: None (start fresh), ``"latest"`` (the newest complete checkpoint, or None when there is
    none), or a checkpoint folder given as a path or as a name inside ``<output_dir>/checkpoints``.
    """
    if resume is None or resume == "":
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("resume='latest': no checkpoint in %s, starting fresh", checkpoints_dir(output_dir))
            return None
        logger.info("resume='latest': resuming from %s", checkpoints[-1])
        return checkpoints[-1]

    path = Path(resume).expanduser()
    if not path.exists() and not path.is_absolute():
        # Also accept a bare name such as "checkpoint-0001000".
        candidate = checkpoints_dir(output_dir) / path
        path = candidate if candidate.exists() else path
    if not path.exists():
        raise FileNotFoundError(
            f"resume={str(resume)!r}: checkpoint {path} does not exist; {_describe_available(output_dir)}"
        )
    if not _is_complete_checkpoint(path):
        reason = (
            "it is an unfinished save (a crash interrupted it)"
            if _TEMP_MARKER in path.name
            else f"it is not a folder written by accelerator.save_state (no {_RNG_STATE_GLOB})"
        )
        raise ValueError(
            f"resume={str(resume)!r}: {path} is not a complete checkpoint: {reason}; {_describe_available(output_dir)}"
        )
    return path


# --- saving ----------------------------------------------------------------------------------------------


def _writes_files(accelerator) -> bool:
    """The process that renames and prunes: the main process, or each node's main one when every node
    has its own disk (``save_on_each_node``), matching where accelerate itself writes."""
    if accelerator.project_configuration.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename or new entry durable; directories cannot be opened like this on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync_file(path)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _remove_temp_dirs(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith("checkpoint-") and _TEMP_MARKER in path.name:
            logger.info("removing unfinished checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _prune(output_dir: str | Path, keep_last: int, just_saved: Path) -> None:
    # The checkpoint just written always stays, even if a run restarted from scratch left higher steps.
    older = [path for path in list_checkpoints(output_dir) if path != just_saved]
    to_remove = older[: max(len(older) - (keep_last - 1), 0)]
    for path in to_remove:
        logger.info("removing old checkpoint %s (keep_last=%d)", path, keep_last)
        # Rename first so a crash mid-delete leaves a *.tmp-* folder, never a half-deleted checkpoint.
        doomed = path.with_name(path.name + _TEMP_MARKER + "deleting")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    *,
    keep_last: int | None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Atomically save the full training state as ``<output_dir>/checkpoints/checkpoint-<step:07d>``.

    Call it on every process: FSDP and DeepSpeed need all ranks in ``save_state``, and every rank writes its
    own RNG state. ``extra_files`` maps file names to text written into the checkpoint (e.g. the resolved
    config). ``keep_last`` keeps that many newest checkpoints, this one included; None keeps all.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r} must be at least 1, or None to keep every checkpoint")
    extra_files = extra_files or {}
    for name in extra_files:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra_files name {name!r} must be a plain file name, without folders")
    if accelerator.project_configuration.automatic_checkpoint_naming:
        # With it, save_state ignores the folder it is given and picks its own name.
        raise ValueError(
            "save_checkpoint names checkpoints itself; create the Accelerator without automatic_checkpoint_naming"
        )

    final = checkpoint_path(output_dir, step)
    # Derived from the step, not random, so that every rank writes into the same folder.
    temp = final.with_name(final.name + _TEMP_MARKER + "incomplete")
    writes_files = _writes_files(accelerator)

    if writes_files:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_temp_dirs(final.parent)  # leftovers of crashed saves, including one of this very step
    accelerator.wait_for_everyone()

    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every rank has finished its files before the folder is published

    if writes_files:
        for name, text in extra_files.items():
            (temp / name).write_text(text, encoding="utf-8")
        _fsync_tree(temp)  # the data must be on disk before the rename makes the checkpoint visible
        if final.exists():
            # Saving a step twice (e.g. a final save right after resuming): move the old one out of the way.
            superseded = final.with_name(final.name + _TEMP_MARKER + "superseded")
            os.replace(final, superseded)
            os.replace(temp, final)
            shutil.rmtree(superseded, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(final.parent)
        logger.info("saved checkpoint %s", final)
        if keep_last is not None:
            _prune(output_dir, keep_last, just_saved=final)
    accelerator.wait_for_everyone()
    return final


# --- loading ---------------------------------------------------------------------------------------------


def load_checkpoint(accelerator, path: str | Path) -> None:
    """Restore everything ``save_checkpoint`` saved (``accelerator.load_state``), with errors that name the folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a folder")
    if not _is_complete_checkpoint(path):
        raise ValueError(
            f"checkpoint {path} is incomplete (an unfinished save, or not written by accelerator.save_state); "
            f"files present: {sorted(p.name for p in path.iterdir())}"
        )
    try:
        accelerator.load_state(str(path))
    except Exception as error:
        # A missing or truncated file surfaces deep inside torch/safetensors; say which checkpoint it was.
        files = sorted(p.name for p in path.iterdir())
        raise RuntimeError(f"could not load checkpoint {path} (files present: {files}): {error}") from error
    logger.info("loaded checkpoint %s", path)


_WRAPPER_PREFIX = re.compile(r"^(?:(?:module|_orig_mod)\.)+")


def check_same_model(path: str | Path, model: torch.nn.Module, hint: str = "") -> None:
    """Fail before loading when checkpoint ``path`` holds other weights than ``model`` has (a changed model
    config): accelerate's own error lists every key and says nothing of the cause. ``hint`` names it.
    Only a single-file ``model.safetensors`` is compared; other layouts are left to accelerate's check."""
    from safetensors import safe_open

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as f:  # keys as saved from the wrapped model (DDP, torch.compile)
            saved = {_WRAPPER_PREFIX.sub("", key): tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception:  # unreadable: load_checkpoint's error names the folder and its files
        return
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if saved == ours:
        return
    missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & saved.keys() if ours[k] != saved[k])
    found = [f"{len(names)} {what}, e.g. {names[0]}" for names, what in
             ((missing, "weights missing"), (unexpected, "weights this model lacks"), (reshaped, "of another shape")) if names]
    raise ValueError(
        f"checkpoint {path} holds a different model than this config builds ({'; '.join(found)}). "
        f"{hint + ' ' if hint else ''}Resume with the model settings and components (VAE, text encoder) the run started with, "
        "or set another train.output_dir to start a new run."
    )


# --- stopping cleanly on SIGINT / SIGTERM ------------------------------------------------------------------


class StopSignal:
    """Turns SIGINT/SIGTERM into ``requested = True`` so the loop can save a final checkpoint and exit.

    A second signal means "stop now": the previous handlers come back, a second SIGINT raises
    KeyboardInterrupt and a second SIGTERM is re-delivered to the previous handler (by default: terminate).
    """

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous_handlers: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "received %s: saving a checkpoint and stopping; send it again to stop immediately", self.signal_name
        )

    def requested_on_any_process(self, accelerator) -> bool:
        """True on every process once any process got a signal, so all ranks stop at the same step (a rank
        that stops alone would hang the others in their next collective). It syncs with the host: call it at
        the logging or checkpoint cadence rather than every micro-step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for signum, handler in self._previous_handlers.items():
            # None means a handler installed from C that Python cannot reinstall; the default is the safe stand-in.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()


def install_signal_handlers(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> StopSignal:
    """Install the graceful-stop handlers; returns the flag the training loop polls (``.requested``).

    Python only lets the main thread install signal handlers; elsewhere nothing is installed, a warning is
    logged, and the returned flag simply never gets set.
    """
    stop = StopSignal()
    if threading.current_thread() is not threading.main_thread():
        logger.warning("not in the main thread: SIGINT/SIGTERM will not trigger a final checkpoint")
        return stop
    for signum in signals:
        stop._previous_handlers[signum] = signal.signal(signum, stop._handle)
    return stop
