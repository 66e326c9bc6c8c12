"""An interrupted run, continued with --resume, is the uninterrupted run: byte for byte, whenever the signal comes.

Each case sends a real signal to this process at one moment of a two-epoch run on real sample images (in the
first batch, between batches, in validation, while the epoch's checkpoint is written, right after it, with and
without loader workers, SIGINT, SIGTERM and SLURM's SIGUSR1, once or twice), continues the run with ``resume``, and
compares the bundle's ``model.safetensors`` byte for byte and ``last.ckpt``'s whole state (weights, optimiser,
schedule) with an uninterrupted run's. (The attack that asked for this: SIGTERM mid-epoch with 2 workers left
weights 112 apart; right after epoch 0's checkpoint, 146.)
"""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch

from cxrlearn.errors import Interrupted
from cxrlearn.training.module import ChestXrayModule
from cxrlearn.training.stopping import resumes_exactly
from cxrlearn.workflows import train as train_workflow
from cxrlearn.workflows.train import train

from cxrlearn.data.decoding.images import attach_images

from test_training import split_file, tiny_config


@pytest.fixture(scope="module")
def present(nih_table, sample_images):
    return attach_images(nih_table, sample_images).table

#: The moments: (what to wrap, when in it to send the signal). Three batches an epoch, two epochs.
MOMENTS = {
    "first step": ("training_step", lambda module, batch_idx: module.current_epoch == 0 and batch_idx == 0),
    "mid-epoch 1": ("training_step", lambda module, batch_idx: module.current_epoch == 1 and batch_idx == 1),
    "validation": ("validation_step", lambda module, batch_idx: module.current_epoch == 0 and batch_idx == 0),
    "checkpoint write": ("checkpoint", lambda module, batch_idx: True),
    "after epoch 0": ("on_train_epoch_end", lambda module, batch_idx: module.current_epoch == 0),
    "last batch": ("training_step", lambda module, batch_idx: module.current_epoch == 1 and batch_idx == 2),
}

CASES = [  # (moment, signal, loader workers, signals sent)
    ("first step", signal.SIGINT, 0, 1),
    ("first step", signal.SIGTERM, 2, 1),
    ("mid-epoch 1", signal.SIGTERM, 0, 1),
    ("mid-epoch 1", signal.SIGUSR1, 2, 1),
    ("validation", signal.SIGTERM, 2, 1),
    ("checkpoint write", signal.SIGINT, 0, 1),
    ("after epoch 0", signal.SIGTERM, 2, 1),
    ("last batch", signal.SIGTERM, 0, 1),
    ("mid-epoch 1", signal.SIGINT, 2, 2),  # twice: stops at once, keeping epoch 0's checkpoint
]
#: ... and in the epoch that unfreezes the backbone (epoch 0 trains the head alone), whose learning rates ramp up.
UNFREEZING = [("mid-epoch 1", signal.SIGTERM, 0, 1)]


@pytest.fixture(scope="module")
def grid(present, table_path, sample_images, tmp_path_factory):
    """The uninterrupted runs, made when first asked for."""
    root = tmp_path_factory.mktemp("grid")
    split = split_file(present, root / "split.csv", n_train=48, n_val=16)
    references = {}

    def reference(workers: int, unfreezing: bool):
        if (workers, unfreezing) not in references:
            config = _config(table_path, sample_images, split, root, workers, unfreezing)
            references[workers, unfreezing] = train(config, root / f"whole-{workers}-{unfreezing}", progress=False)
        return references[workers, unfreezing]

    return root, split, reference


def _config(table_path, sample_images, split, root, workers, unfreezing=False):
    optim = {"head_only_epochs": 1, "unfreeze_warmup": True} if unfreezing else {}
    return tiny_config(table_path, sample_images, split, root, data={"num_workers": workers}, optim=optim,
                       model={"head": {"units": 64, "dropout": 0.3}}, train={"epochs": 2, "seed": 5})


def _arm(monkeypatch, moment: str, number: int, times: int):
    """Send ``number`` to this process ``times`` times at ``moment`` (once in the run)."""
    where, when = MOMENTS[moment]
    fired = []

    def fire():
        fired.append(True)
        for _ in range(times):
            os.kill(os.getpid(), number)

    if where == "checkpoint":  # inside the epoch's first checkpoint write, before its bytes are written
        original_write = train_workflow.write_atomic

        def write(path, data, *args, **kwargs):
            if not fired and str(path).endswith(".ckpt"):
                fire()
            return original_write(path, data, *args, **kwargs)

        monkeypatch.setattr(train_workflow, "write_atomic", write)
        return fired
    original = getattr(ChestXrayModule, where)

    def wrapped(self, *args, **kwargs):
        batch_idx = args[1] if len(args) > 1 else None
        if not fired and when(self, batch_idx):
            fire()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChestXrayModule, where, wrapped)
    return fired


def _state(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {key: checkpoint[key] for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch",
                                             "global_step")}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _table(run):
    """The run's metrics table, less what depends on the clock."""
    with open(run / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if "images_per_sec" not in k and v != ""} for row in rows]


@pytest.mark.parametrize("moment,number,workers,times,unfreezing",
                         [(*case, False) for case in CASES] + [(*case, True) for case in UNFREEZING],
                         ids=[f"{m}-{signal.Signals(n).name}-{w}workers-x{t}" for m, n, w, t in CASES]
                         + [f"unfreezing-{m}-{signal.Signals(n).name}-{w}workers" for m, n, w, _ in UNFREEZING])
def test_interrupted_and_resumed_is_the_uninterrupted_run(grid, table_path, sample_images, tmp_path, monkeypatch,
                                                           moment, number, workers, times, unfreezing):
    root, split, reference = grid
    config = _config(table_path, sample_images, split, root, workers, unfreezing)
    run = tmp_path / "run"
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = [signal.getsignal(n) for n in handled]
    with monkeypatch.context() as armed:
        fired = _arm(armed, moment, number, times)
        with pytest.raises(Interrupted) as stopped:
            train(config, run, progress=False)
    assert fired, "the signal was never sent: the moment is not in the run"
    assert stopped.value.signal_name == signal.Signals(number).name
    assert stopped.value.resume == "--resume" and str(run / "checkpoints" / "last.ckpt") in stopped.value.kept
    assert not (run / "model.safetensors").exists()
    assert [signal.getsignal(n) for n in handled] == before  # the handlers training set are gone with it

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumes_exactly(checkpoint)
    train(config, run, resume=True, progress=False)
    whole = reference(workers, unfreezing)
    assert (run / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert _same(_state(run / "checkpoints" / "last.ckpt"), _state(whole / "checkpoints" / "last.ckpt"))
    assert _table(run) == _table(whole)
    assert not list((run / "logs").glob("resumed-*"))


def test_a_mid_epoch_checkpoint_without_the_loaders_place_is_named_as_inexact(grid, table_path, sample_images,
                                                                             tmp_path, monkeypatch, caplog):
    """A checkpoint written mid-epoch by an earlier cxrlearn (no loader position): resuming it says, in cxrlearn's
    words, that the run will differ; Lightning's "This can cause unreliable results" is not shown."""
    root, split, _ = grid
    config = _config(table_path, sample_images, split, root, 0)
    run = tmp_path / "run"
    with monkeypatch.context() as armed:
        _arm(armed, "mid-epoch 1", signal.SIGTERM, 1)
        with pytest.raises(Interrupted):
            train(config, run, progress=False)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert resumes_exactly(checkpoint)
    del checkpoint["callbacks"]["StopBetweenBatches"]  # as written before cxrlearn kept the loader's place
    checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    assert not resumes_exactly(checkpoint)
    torch.save(checkpoint, last)
    with pytest.warns() as shown:
        train(config, run, resume=True, progress=False)
    assert "the continued run repeats that epoch's first batches" in caplog.text
    assert not [w for w in shown if "unreliable results" in str(w.message)]
