"""Defaults shared across the layers, each written once.

``SEED`` is Kufel et al. 2023's split seed; cxrlearn uses it wherever a seed is not given (the split,
training's randomness, augmentation, the bootstrap), so that a run is reproducible by default.
``RATIOS`` are the custom split's train/val/test proportions (70/10/20). ``IMAGE_SIZE`` is the paper's
backbone's native input size, used by training and ``cxrlearn prepare`` alike unless told otherwise.
"""

import os
import re

SEED = 2137
RATIOS = (0.7, 0.1, 0.2)
#: The network's input side (and the cache's, unless told otherwise): EfficientNet-B1's native resolution.
IMAGE_SIZE = 240


def whole_number(text: str | None) -> int | None:
    """``text`` as a whole number when it is one written in ASCII digits, else None (``str.isdigit`` also
    accepts "²", which ``int`` then refuses)."""
    return int(text) if text is not None and re.fullmatch(r"[0-9]+", text) else None


#: The whole numbers launchers (torchrun, Lightning, SLURM) hand a training process in its environment.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                      "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS",
                      "SLURM_RESTART_COUNT")


def launcher_environment_problems() -> list[str]:
    """``NAME='value'`` for each launcher variable (:data:`LAUNCHER_VARIABLES`) set to something that is not a
    whole number (Lightning would stop on it with a traceback)."""
    return [f"{name}={os.environ[name]!r}" for name in LAUNCHER_VARIABLES
            if os.environ.get(name, "") != "" and whole_number(os.environ[name]) is None]


def launch_rank() -> int:
    """This process's rank among the processes of one training run, as its launcher set it before Lightning
    starts: torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or Lightning's own launcher's ``NODE_RANK`` and
    ``LOCAL_RANK`` (1 for any process but the first); 0 when launched alone (or when the values are not whole
    numbers, which :func:`launcher_environment_problems` names before training starts)."""
    for name in ("RANK", "SLURM_PROCID"):
        if (rank := whole_number(os.environ.get(name))) is not None:
            return rank
    return 0 if os.environ.get("NODE_RANK", "0") == os.environ.get("LOCAL_RANK", "0") == "0" else 1


def launched_with_others() -> bool:
    """Whether a launcher started this process as one of several of one run (torchrun's ``WORLD_SIZE``, SLURM's
    ``SLURM_NTASKS``, or a rank other than the first): they start together and may share folders."""
    sizes = (os.environ.get("WORLD_SIZE", ""), os.environ.get("SLURM_NTASKS", ""))
    return launch_rank() != 0 or any((whole_number(size) or 0) > 1 for size in sizes)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: The radiographs the model is for, as the DICOM commands route them by their headers (``--accept``,
#: :mod:`cxrlearn.dicom.routing`), and as the model card states them: modalities, body parts, view positions.
ACCEPT_MODALITIES, ACCEPT_BODY_PARTS, ACCEPT_VIEWS = ("CR", "DX"), ("CHEST",), ("PA", "AP")
