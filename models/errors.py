"""One root exception; each subclass also inherits the matching built-in.

Every message says what is wrong and how to fix it, in one line, so the CLI can print
it as is.
"""


class LiveIndexError(Exception):
    """Root of every error liveindex raises on purpose."""


class ProtocolError(LiveIndexError, ValueError):
    """A message that does not parse or validate. Carries the offending header."""

    def __init__(self, message: str, header: dict | None = None):
        self.header = header
        if header is not None:
            shown = {k: v for k, v in header.items() if k != "metadata"}
            message = f"{message} (header: {shown})"
        super().__init__(message)


class InputError(LiveIndexError, ValueError):
    """Bad user input: a file, an array, an option value."""


class GeometryError(InputError):
    """A detector geometry (projection centre, tilts, shape) that cannot be right."""


class TransportError(LiveIndexError, ConnectionError):
    """A peer that cannot be reached or that went away."""
