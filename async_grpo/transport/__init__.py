"""transport: how trajectories reach the learner and how weights reach the rollout workers.

- trajectory.py  the `Trajectory` record one completion travels as
- trajectory_batch.py  many trajectories as columns (`TrajectoryBatch`) and lazy per-row `TrajectoryView`s
- wire_columns.py      the binary block of per-trajectory scalars inside a message
- codec.py       the wire format (msgpack header + raw tensor frames) and the checks on receipt
- trajectory_queue.py  the learner's bounded queue of received messages, counted in trajectories
- stream.py      ZeroMQ PUSH (`TrajectoryStream`, workers) -> PULL (`TrajectoryReceiver`, learner)
- curve.py       optional CURVE authentication of the learner's sockets
- control.py     weights-ready announcements (PUB/SUB), polled without blocking by workers
- endpoints.py   bind host, and publishing the learner's addresses through the torch.distributed store
- sync_groups.py the learner-rank-0 + worker-group process groups used for weight broadcasts
- weight_buckets.py, weights.py  packing and broadcasting the weights with timeouts
"""

from async_grpo.transport.codec import MalformedMessage, UnsupportedSchema, decode, encode
from async_grpo.transport.control import WeightsAnnouncer, WeightsListener
from async_grpo.transport.curve import write_curve_keys
from async_grpo.transport.endpoints import (
    EndpointsTimeout,
    LearnerEndpoints,
    LearnerSockets,
    open_learner_sockets,
    publish_endpoints,
    read_endpoints,
    resolve_bind_host,
)
from async_grpo.transport.stream import PushTimeout, TrajectoryReceiver, TrajectoryStream
from async_grpo.transport.sync_groups import make_sync_groups, sync_group_layout
from async_grpo.transport.trajectory import Trajectory
from async_grpo.transport.trajectory_batch import TrajectoryBatch, TrajectoryView
from async_grpo.transport.weights import SyncError, SyncTimeout, WeightPublisher, WeightReceiver, WeightSender

__all__ = [
    "EndpointsTimeout", "LearnerEndpoints", "LearnerSockets", "MalformedMessage", "PushTimeout", "SyncError",
    "SyncTimeout", "Trajectory", "TrajectoryBatch", "TrajectoryReceiver", "TrajectoryStream", "TrajectoryView",
    "UnsupportedSchema", "WeightPublisher", "WeightReceiver",
    "WeightSender", "WeightsAnnouncer", "WeightsListener", "decode", "encode", "make_sync_groups",
    "open_learner_sockets", "publish_endpoints", "read_endpoints", "resolve_bind_host", "sync_group_layout",
    "write_curve_keys",
]
