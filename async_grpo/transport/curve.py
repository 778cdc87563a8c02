"""ZeroMQ CURVE authentication and encryption for the learner's sockets.

The learner's sockets (trajectory PULL, weights-ready PUB) are CURVE servers with the learner's key
pair; a ZAP authenticator thread admits only clients whose public key file lies in
`allowed_clients_dir`. Workers connect as CURVE clients with their own key pair and the learner's
public key. A client with any other key never completes the handshake, so nothing it sends is
delivered. Key files are in pyzmq's `zmq.auth` certificate format; `write_curve_keys` makes a set.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from async_grpo.config import CurveConfig


def _load_pair(path: str | None, key: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if path is None:
        raise ValueError(f"transport.curve.{key} is not set: expected a zmq.auth certificate file")
    if not Path(path).is_file():
        raise ValueError(f"transport.curve.{key} = {path!r}: expected an existing zmq.auth certificate file")
    public, secret = zmq.auth.load_certificate(path)
    if need_secret and secret is None:
        raise ValueError(f"transport.curve.{key} = {path!r}: expected a secret key file (*.key_secret)")
    return public, secret


def write_curve_keys(directory: str | Path, worker_names: tuple[str, ...] = ("worker",)) -> CurveConfig:
    """Make a learner key pair, one key pair per worker name and the allowed-clients directory.

    Returns the enabled `CurveConfig` that uses the first worker's key pair.
    """
    if not worker_names:
        raise ValueError("write_curve_keys() got no worker names: expected at least one")
    root = Path(directory)
    allowed = root / "allowed_clients"
    for sub in (root, root / "workers", allowed):
        sub.mkdir(parents=True, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(root, "learner")
    client_secrets = []
    for name in worker_names:
        public, secret = zmq.auth.create_certificates(root / "workers", name)
        (allowed / Path(public).name).write_bytes(Path(public).read_bytes())
        client_secrets.append(secret)
    return CurveConfig(
        enabled=True,
        server_secret_file=str(server_secret),
        server_public_file=str(server_public),
        client_secret_file=str(client_secrets[0]),
        allowed_clients_dir=str(allowed),
    )


def start_authenticator(context: zmq.Context, cfg: CurveConfig) -> ThreadAuthenticator:
    """Admit only the public keys in `cfg.allowed_clients_dir` to CURVE servers of `context`."""
    allowed = cfg.allowed_clients_dir
    if allowed is None or not Path(allowed).is_dir():
        raise ValueError(f"transport.curve.allowed_clients_dir = {allowed!r}: expected an existing directory")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=allowed)
    return auth


def make_curve_server(socket: zmq.Socket, cfg: CurveConfig) -> None:
    """Turn `socket` (before bind) into a CURVE server with the learner's key pair."""
    public, secret = _load_pair(cfg.server_secret_file, "server_secret_file", need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def make_curve_client(socket: zmq.Socket, cfg: CurveConfig) -> None:
    """Turn `socket` (before connect) into a CURVE client of the learner with this worker's key pair."""
    public, secret = _load_pair(cfg.client_secret_file, "client_secret_file", need_secret=True)
    server_public, _ = _load_pair(cfg.server_public_file, "server_public_file", need_secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public
