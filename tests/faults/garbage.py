"""Malformed trajectory messages, and a client that floods a learner's trajectory endpoint with them.

Each kind starts from a real message made by the codec's own `encode` and breaks one thing (or is
not a message at all), so the kinds stay malformed as the codec evolves; `malformed_messages` checks
with `decode` that every one is refused, so a test can count exactly what the learner must reject.
Most kinds carry a 64 KiB frame: a learner that kept rejected messages would grow visibly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import torch
import zmq

from async_grpo.transport.codec import MalformedMessage, decode, encode
from async_grpo.transport.trajectory import Trajectory

JUNK = 64 * 1024


def _bytes(frame: Any) -> bytes:
    if isinstance(frame, torch.Tensor):
        frame = frame.numpy()
    return bytes(memoryview(frame).cast("B"))


def _valid_frames() -> list[bytes]:
    traj = Trajectory(torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([-0.5, -0.25]),
                      1.0, 0.5, 0, 0, 0, "stop", 0)
    return [_bytes(f) for f in encode([traj])]


def malformed_messages(max_message_bytes: int) -> dict[str, list[bytes]]:
    """One message per kind of garbage, each refused by `decode` (checked here)."""
    valid = _valid_frames()
    header = msgpack.unpackb(valid[0])
    junk = os.urandom(JUNK)

    def with_header(**changes: Any) -> list[bytes]:
        return [msgpack.packb({**header, **changes}), *valid[1:]]

    kinds = {
        "not_msgpack": [junk],
        "header_not_a_mapping": [msgpack.packb([1, 2, 3]), junk],
        "unknown_schema": with_header(schema=99),
        "count_mismatch": with_header(count=10**6),
        "tensor_frame_wrong_size": [valid[0], valid[1], junk, *valid[3:]],
        "extra_frame": [*valid, junk],
        "empty_frame": [b""],
    }
    for name, frames in kinds.items():
        try:
            decode(frames, max_message_bytes)
        except MalformedMessage:
            continue
        raise AssertionError(f"garbage kind {name!r} decodes: it would not be rejected")
    return kinds


def flood(endpoint: str, messages: list[list[bytes]], timeout_s: float, curve: dict[str, bytes] | None = None) -> int:
    """Send every message (blocking on back-pressure up to `timeout_s` in all); returns how many left.

    `curve`: {"public", "secret", "server"} keys for a CURVE client; None connects in the clear.
    """
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.linger = int(timeout_s * 1000)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = (
            curve["public"], curve["secret"], curve["server"])
    sock.connect(endpoint)
    deadline = time.monotonic() + timeout_s
    sent = 0
    try:
        for frames in messages:
            while True:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    sent += 1
                    break
                except zmq.Again:
                    if time.monotonic() > deadline:
                        return sent
                    sock.poll(50, zmq.POLLOUT)
    finally:
        sock.close()  # waits up to the linger for queued messages to leave
        context.term()
    return sent
