"""The learner-side ZeroMQ sockets' life: binding to host:port, and releasing their context.

Port 0 means "any free port": the bound port is returned and then published (endpoints.py), which is
how a cluster run needs no port configured by hand. A failure is one ValueError naming the socket's
role and the address; the caller releases its context (`release_context`) before passing it on.
"""

from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator


def bind_socket(socket: zmq.Socket, host: str, port: int, what: str) -> int:
    """Bind `socket` to tcp://host:port (port 0: a free one) and return the bound port."""
    try:
        if port == 0:
            return socket.bind_to_random_port(f"tcp://{host}")
        socket.bind(f"tcp://{host}:{port}")
        return port
    except zmq.ZMQError as err:
        raise ValueError(f"cannot bind the {what} to tcp://{host}:{port}: {err}") from None


def release_context(context: zmq.Context, auth: ThreadAuthenticator | None) -> None:
    """Stop the CURVE authenticator, if any, then destroy the context without waiting on unsent messages."""
    if auth is not None:
        auth.stop()
    context.destroy(linger=0)
