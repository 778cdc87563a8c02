"""Binding a learner-side ZeroMQ socket (trajectory PULL, weights-ready PUB) to host:port.

Port 0 means "any free port": the bound port is returned and then published (endpoints.py), which is
how a cluster run needs no port configured by hand. A failure is one ValueError naming the socket's
role and the address; the caller releases its context before passing it on.
"""

from __future__ import annotations

import zmq


def bind_socket(socket: zmq.Socket, host: str, port: int, what: str) -> int:
    """Bind `socket` to tcp://host:port (port 0: a free one) and return the bound port."""
    try:
        if port == 0:
            return socket.bind_to_random_port(f"tcp://{host}")
        socket.bind(f"tcp://{host}:{port}")
        return port
    except zmq.ZMQError as err:
        raise ValueError(f"cannot bind the {what} to tcp://{host}:{port}: {err}") from None
