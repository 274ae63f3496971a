"""ZeroMQ plumbing shared by every process: sockets with clear errors, and a receiver
that counts and drops bad messages instead of stopping its loop."""

from __future__ import annotations

import logging

import zmq

from liveindex.models.errors import ProtocolError, TransportError

from .protocol import Message, decode

log = logging.getLogger(__name__)


def open_socket(context: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
                send_timeout: float | None = None, immediate: bool = False, keys=None) -> zmq.Socket:
    """A socket bound or connected, with ZeroMQ's errors turned into one-line fixes.

    With ``keys`` (security.CurveKeys) the socket speaks CurveZMQ: a bound socket is the
    server and accepts only the clients whose keys it knows.
    """
    sock = context.socket(kind)
    if keys is not None:
        keys.as_server(context, sock) if bind else keys.as_client(sock)
    sock.setsockopt(zmq.LINGER, 2000)
    if immediate:
        # Queue only to completed connections, so a send to a peer that is not there
        # times out (and says so) instead of queueing forever.
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if send_timeout is not None:
        sock.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
    address = bind or connect
    try:
        if bind:
            sock.bind(bind)
        else:
            sock.connect(connect)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        verb = "bind to" if bind else "connect to"
        if exc.errno == zmq.EADDRINUSE:
            raise TransportError(f"cannot {verb} {address}: the port is in use; choose another port or stop the other process") from None
        raise TransportError(
            f"cannot {verb} {address} ({exc}); addresses look like tcp://127.0.0.1:5555 or ipc:///tmp/liveindex.sock"
        ) from None
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class Receiver:
    """Decode messages; count, log (once per distinct problem) and drop bad ones."""

    def __init__(self, bad_counter=None, role: str = ""):
        self.bad_counter = bad_counter
        self.role = role
        self.bad_total = 0
        self._seen_problems: set[str] = set()

    def decode(self, frames) -> Message | None:
        try:
            return decode(frames)
        except ProtocolError as exc:
            self.reject(exc)
            return None

    def reject(self, exc: Exception) -> None:
        self.bad_total += 1
        if self.bad_counter is not None:
            self.bad_counter.inc()
        problem = str(exc).split(" (header:")[0]
        if problem not in self._seen_problems:
            self._seen_problems.add(problem)
            log.warning("%s dropped a bad message: %s", self.role or "receiver", exc)
