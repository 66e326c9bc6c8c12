"""Stopping a training run where it can be continued exactly.

A signal (Ctrl-C's SIGINT, SIGTERM as SLURM and Kubernetes stop a job, SLURM's SIGUSR1 warning) can arrive at any
moment: inside an optimiser step, half-way through validation, while a checkpoint is written. Acting on it there
leaves a state no uninterrupted run ever had (weights half updated, a validation AUC over some of the images, an
epoch's loader restarted from its first batch), and a run continued from it is another run.

:class:`StopBetweenBatches` only notes the first signal, and training stops at the next moment that an
uninterrupted run passes through too:

* after a training batch (its optimiser step done): ``last.ckpt`` is written with the loader's position in the
  epoch (:class:`cxrlearn.data.pipeline.datamodule.ResumableLoader`) and the random state that the next batch's
  dropout draws from, so ``--resume`` goes on with the next batch as if nothing had happened;
* after an epoch's last batch, validation and the epoch's checkpoints are let finish (the run stops before the
  next epoch's first batch: ``last.ckpt`` then holds the whole epoch);
* after the last epoch, the run stops before the bundle is written (``--resume`` writes it).

A second signal stops at once, keeping the last checkpoint written (exact too; the work since it is lost). A write
killed half-way leaves the previous checkpoint whole (checkpoints are written beside, then renamed).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from cxrlearn.errors import Interrupted

log = logging.getLogger(__name__)

#: The signals that stop training: Ctrl-C, a scheduler's stop, SLURM's warning that time runs out.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopBetweenBatches(Callback):
    """See the module's description. ``path``: the run's ``last.ckpt``. After fitting, :attr:`requested` is the
    signal's name if one came (the caller then stops before its next step) and :attr:`kept` says what was kept."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.requested: str | None = None
        self.kept = ""
        self._previous: dict = {}
        self._trainer = None
        self._rng: dict | None = None  # restored from a checkpoint saved between batches; used by its next batch

    # ---- signals ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Here, after Lightning set its own SIGTERM handler (which would stop validation half-way).
        self._trainer = trainer
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._note) for number in STOP_SIGNALS}

    def _note(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.requested is not None:
            raise Interrupted(name)
        self.requested = name
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if launcher is not None and hasattr(launcher, "kill"):  # processes Lightning started itself get it too
            launcher.kill(number)
        log.warning(f"{name}: training stops after the batch in progress (an epoch's validation and checkpoint "
                    f"finish first), keeping its progress for --resume; {name} again stops at once, keeping the "
                    f"last checkpoint written")

    def _restore_signals(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signals()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_signals()
        if isinstance(exception, (Interrupted, KeyboardInterrupt)):
            for logger in trainer.loggers:  # what was logged so far goes into the run's table, which --resume continues
                logger.save()

    def _stop_agreed(self, trainer) -> bool:
        """Whether to stop here; in a run of several processes, whether any of them was asked (all stop at the
        same batch, as a checkpoint needs every process)."""
        stop = self.requested is not None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.requested is None:
                self.requested = "SIGTERM"
        return stop

    # ---- the moments that an uninterrupted run passes through --------------------------------
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._stop_agreed(trainer):  # last.ckpt holds the epoch before (or the batch a resumed run began at)
            self.kept = f"training's progress up to epoch {trainer.current_epoch} (as the progress bar counts): " \
                        f"{self.path}" if self.path.exists() else ""
            raise Interrupted(self.requested, self.kept, "--resume" if self.kept else "")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng is not None:  # the random state the interrupted run had after the batch before this one
            torch.set_rng_state(self._rng["torch"])
            if self._rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng["cuda"])
            self._rng = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done, batches = batch_idx + 1, int(trainer.num_training_batches)
        if done >= batches or done % trainer.accumulate_grad_batches:
            return  # the epoch's end (its checkpoint follows validation), or gradients not yet applied
        if not self._stop_agreed(trainer):
            return
        loader = trainer.train_dataloader
        loader.position = (trainer.current_epoch, done)
        self._between_batches = True
        try:
            trainer.save_checkpoint(self.path)
        finally:
            loader.position, self._between_batches = None, False
        self.kept = (f"training's progress in epoch {trainer.current_epoch} (as the progress bar counts), after "
                     f"{done:,} of {batches:,} batches: {self.path}")
        raise Interrupted(self.requested, self.kept, "--resume")

    # ---- what a checkpoint saved between batches holds beyond Lightning's own ----------------
    _between_batches = False

    def state_dict(self) -> dict:
        if not self._between_batches:
            return {}
        return {"torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng = {"torch": state_dict["torch_rng"], "cuda": state_dict["cuda_rng"]} if state_dict else None


def first_step_to_log(checkpoint: dict) -> int:
    """The logging step at which a run resumed from ``checkpoint`` logs its first row: rows of the run's table
    from this step on were logged after the checkpoint was written, and the resumed run logs them again.
    (Lightning counts a batch as stepped only after its end hooks, during which a checkpoint between batches is
    written, and counts it on resuming.)"""
    state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    stepped = int(state.get("_batches_that_stepped", 0))
    return stepped + 1 if between_batches(checkpoint) else stepped


def between_batches(checkpoint: dict) -> bool:
    """Whether ``checkpoint`` was written between two batches of an epoch (by :class:`StopBetweenBatches`)."""
    return bool(checkpoint.get("callbacks", {}).get(StopBetweenBatches.__qualname__))


def resumes_exactly(checkpoint: dict) -> bool:
    """Whether a run continued from ``checkpoint`` is the uninterrupted run: one written at an epoch's end or
    between batches by :class:`StopBetweenBatches`, not one written mid-epoch without the loader's place (by an
    earlier cxrlearn, or by other code), from which Lightning repeats the epoch's first batches."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    finished = progress.get("is_last_batch", True) or not progress.get("current", {}).get("completed", 0)
    return bool(finished) or between_batches(checkpoint)
