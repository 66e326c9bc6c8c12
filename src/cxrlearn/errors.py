"""Exceptions raised by cxrlearn.

Every error a user can cause with bad input is a :class:`CxrlearnError`; the CLI
prints its message (which names the file, row or field at fault) and exits with
status 2 instead of showing a traceback.
"""


class CxrlearnError(Exception):
    """Base class for errors caused by input the user gave cxrlearn."""


class DataError(CxrlearnError):
    """A label table, split file, image or image folder cannot be used as given."""


class ConfigError(CxrlearnError):
    """A setting (backbone name, image size, configuration file) cannot be used."""


class ImageTooLarge(DataError):
    """An image whose decoded pixels would exceed the budget (:data:`cxrlearn.data.decoding.images.MAX_DECODED_BYTES`),
    refused from its header before decoding. The service answers it with 413."""


class Interrupted(BaseException):
    """The work was stopped from outside: Ctrl-C (SIGINT) or SIGTERM, as SLURM and Kubernetes stop a job (or SIGUSR1,
    SLURM's warning that a job's time is running out).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it. ``kept`` says
    what was kept and ``resume`` how to continue (both may be empty); the CLI prints them and exits 130.
    """

    def __init__(self, signal_name: str = "SIGINT", kept: str = "", resume: str = ""):
        super().__init__(signal_name)
        self.signal_name, self.kept, self.resume = signal_name, kept, resume

    @classmethod
    def keeping(cls, interrupt: BaseException, kept: str, resume: str = "") -> "Interrupted":
        """The interrupt (an :class:`Interrupted`, or Python's own KeyboardInterrupt from Ctrl-C), saying what was
        kept and how to continue."""
        return cls(getattr(interrupt, "signal_name", "SIGINT"), kept, resume)
