"""Errors that the CLI reports as one line (no traceback unless --debug)."""


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
