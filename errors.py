"""The project's one exception type and its subclasses.

Anything a user can cause (a bad file, a bad value, a missing optional
backend) raises a subclass of :class:`InfiniError`. The CLI turns these into a
one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""


class InfiniError(Exception):
    """Base class of every error a user can cause."""


class BadInputError(InfiniError, ValueError):
    """A value or file given by the user is not what was expected."""


class IncompatibleArtifactError(InfiniError):
    """A checkpoint, graph, engine, manifest or snapshot does not match what it is used with."""


class MissingBackendError(InfiniError, ImportError):
    """An optional dependency (onnxruntime-gpu, tensorrt, triton, a GPU) is not available."""


class NumericalFaultError(InfiniError, FloatingPointError):
    """The state became NaN or Inf; continuing would only spread it."""


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) raised where the program is, so that cleanup runs as for Ctrl-C;
    ``signum`` gives the CLI its exit code (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
