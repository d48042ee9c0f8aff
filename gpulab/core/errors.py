"""Errors that the CLI reports as one line (no traceback unless --debug)."""


def series(items, conj: str = "or") -> str:
    """``a, b or c`` (``conj``: "or" or "and") for a message naming choices or options; one item alone as it is."""
    *first, last = [str(i) for i in items]
    return f"{', '.join(first)} {conj} {last}" if first else last


class GpulabError(Exception):
    """A known failure: bad input, a missing tool, no GPU where one is needed.

    The CLI prints ``error: <message>`` on stderr and exits with code 1.
    """


class InputError(GpulabError):
    """A bad path, a malformed file, an invalid parameter value or shape."""


class DeviceError(GpulabError):
    """The requested device or a device feature is not available."""


class ToolError(GpulabError):
    """An external tool (ncu, nvcc) is missing or failed."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (``timeout``, a job scheduler) while a command runs; the CLI prints ``error:
    interrupted`` (or ``terminated``) and exits 128 + the signal's number, after the ``finally`` blocks on the way
    have removed what was half-written (a SIGTERM left a temporary folder of partial shards behind).

    Not a KeyboardInterrupt, which Typer turns into an exit code of 130 returned like any result (click: an
    Abort, an Exception): a sweep of ``gpulab run`` would take it for one failed run and go on. Not an
    Exception either, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int = 2) -> None:  # 2: SIGINT
        super().__init__(signum)
        self.signum = signum
