"""CurveZMQ for traffic that leaves the host: key files, and sockets that use them.

``liveindex keys DIR`` writes two key pairs with pyzmq's own tools:

    server.key, server.key_secret   the dispatcher (in ``publish``) and the sink
    client.key, client.key_secret   workers, and the publisher's link to the sink

Every process takes ``--keys DIR``. Servers need ``server.key_secret`` and accept only
the client public keys (``*.key``) found in DIR; clients need ``client.key_secret`` and
``server.key``. A peer without an accepted key completes no handshake: it receives
nothing and nothing it sends is delivered.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from liveindex.models.errors import InputError

log = logging.getLogger(__name__)

_authenticators: dict[int, ThreadAuthenticator] = {}
_auth_lock = threading.Lock()


def make_keys(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (folder / f"{name}.key_secret").exists():
            raise InputError(f"{folder / (name + '.key_secret')} exists; keys are never overwritten. "
                             "Choose an empty folder or delete the old keys first")
    written = []
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(folder, name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


@dataclass(frozen=True)
class CurveKeys:
    folder: Path

    @classmethod
    def load(cls, folder: str | Path | None) -> "CurveKeys | None":
        if folder is None:
            return None
        if not zmq.has("curve"):
            raise InputError("this libzmq was built without CURVE support; install pyzmq's wheel (it has it)")
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"key folder {folder} does not exist; make keys with `liveindex keys {folder}`")
        return cls(folder)

    def _pair(self, name: str) -> tuple[bytes, bytes | None]:
        secret = self.folder / f"{name}.key_secret"
        public = self.folder / f"{name}.key"
        path = secret if secret.exists() else public
        if not path.exists():
            raise InputError(f"{secret} is missing; copy it from the host where `liveindex keys` made the keys")
        return zmq.auth.load_certificate(path)

    def as_server(self, context: zmq.Context, sock: zmq.Socket) -> None:
        """Call before bind: the socket accepts only clients whose public key is in the folder."""
        public, secret = self._pair("server")
        if secret is None:
            raise InputError(f"{self.folder / 'server.key_secret'} is missing; a dispatcher or sink needs it")
        with _auth_lock:
            if id(context) not in _authenticators:
                auth = ThreadAuthenticator(context)
                auth.start()
                auth.configure_curve(domain="*", location=str(self.folder))
                _authenticators[id(context)] = auth
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def as_client(self, sock: zmq.Socket) -> None:
        """Call before connect."""
        public, secret = self._pair("client")
        if secret is None:
            raise InputError(f"{self.folder / 'client.key_secret'} is missing; workers need it")
        server_public, _ = self._pair("server")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


def stop_authenticator(context: zmq.Context) -> None:
    """Stop the context's authenticator, if it has one (before ``context.term()``)."""
    with _auth_lock:
        auth = _authenticators.pop(id(context), None)
    if auth is not None:
        auth.stop()
