"""Transport benchmarks: trajectory stream throughput and weight broadcast bandwidth.

    python bench/transport.py trajectories          # TrajectoryStream/Receiver vs raw pyzmq, same bytes
    python bench/transport.py weights               # CPU: spawns 2 gloo processes, small model
    torchrun --nproc-per-node 2 bench/transport.py weights --params 5e8   # GPU: NCCL, bf16

Every figure is the median of --repeats rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
import zmq

from async_grpo.config import TransportConfig
from async_grpo.transport.codec import decode, encode
from async_grpo.transport.stream import TrajectoryReceiver, TrajectoryStream
from async_grpo.transport.trajectory import Trajectory
from async_grpo.transport.trajectory_batch import TrajectoryBatch
from async_grpo.transport.weights import WeightPublisher, WeightReceiver, broadcast_with_timeout


def make_group(group_id: int, group_size: int, prompt_len: int, completion_len: int) -> list[Trajectory]:
    prompt = torch.randint(0, 150_000, (prompt_len,), dtype=torch.int32)  # shared by the group's samples
    return [
        Trajectory(prompt, torch.randint(0, 150_000, (completion_len,), dtype=torch.int32),
                   -torch.rand(completion_len), 1.0, 0.5, group_id, i, 0, "length", 0)
        for i in range(group_size)
    ]


def message_bytes(frames: list) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def make_messages(args: argparse.Namespace, per_message: int) -> list[list[Trajectory]]:
    """The run's trajectories (same seed every time), cut into messages of `per_message`."""
    torch.manual_seed(0)
    groups = [make_group(i, args.group_size, args.prompt_len, args.completion_len) for i in range(args.groups)]
    flat = [t for g in groups for t in g]
    return [flat[i : i + per_message] for i in range(0, len(flat), per_message)]


def as_columns(message: list[Trajectory]) -> TrajectoryBatch:
    """The message as one packed columnar batch: what a worker now builds from its groups' token lists."""
    return decode(encode(message), 2**40)


def produce(conn: Connection, args: argparse.Namespace) -> None:
    """Producer process: serves rounds on command, keeping its sockets and pre-built messages between them.

    A command is (mode, per_message, endpoint); a round is one warm-up message and then every message.
    "raw" sends the pre-encoded frames of the same messages through a plain PUSH socket; "list" pushes
    lists of Trajectory objects (encoded at every push); "columns" pushes columnar batches (a worker's
    groups: only the header and the scalar columns are encoded at each push).
    """
    torch.set_num_threads(1)
    context = zmq.Context()
    raw_sockets: dict[str, zmq.Socket] = {}
    streams: dict[str, TrajectoryStream] = {}
    messages: dict[int, list[list[Trajectory]]] = {}
    encoded: dict[int, list[list]] = {}
    columns: dict[int, list[TrajectoryBatch]] = {}
    while (command := conn.recv()) is not None:
        mode, per_message, endpoint = command
        if per_message not in messages:
            messages[per_message] = make_messages(args, per_message)
            encoded[per_message] = [encode(m) for m in messages[per_message]]
            columns[per_message] = [as_columns(m) for m in messages[per_message]]
        if mode == "raw":
            if endpoint not in raw_sockets:
                raw_sockets[endpoint] = context.socket(zmq.PUSH)
                # The options TrajectoryStream sets, so both paths see the same queueing.
                raw_sockets[endpoint].sndhwm = TransportConfig().send_hwm
                raw_sockets[endpoint].immediate = True
                raw_sockets[endpoint].connect(endpoint)
            push = raw_sockets[endpoint]
            for frames in [encoded[per_message][0], *encoded[per_message]]:
                push.send_multipart(frames, copy=False)
        else:
            if endpoint not in streams:
                streams[endpoint] = TrajectoryStream(endpoint, TransportConfig(), linger_ms=-1)
            stream = streams[endpoint]
            pushed = messages[per_message] if mode == "list" else columns[per_message]
            for message in [pushed[0], *pushed]:
                stream.push(message)
        conn.send("sent")
    for stream in streams.values():
        stream.close()
    for push in raw_sockets.values():
        push.close(linger=-1)
    context.term()


def time_raw_round(pull: zmq.Socket, conn: Connection, per_message: int, num_messages: int, endpoint: str) -> float:
    """Seconds from the warm-up message to the last message at a plain PULL socket."""
    conn.send(("raw", per_message, endpoint))
    pull.recv_multipart(copy=False)
    started = time.perf_counter()
    for _ in range(num_messages):
        pull.recv_multipart(copy=False)
    elapsed = time.perf_counter() - started
    conn.recv()
    return elapsed


def time_stream_round(receiver: TrajectoryReceiver, conn: Connection, mode: str, per_message: int, total: int) -> float:
    """Seconds from the warm-up message to the last trajectory handed out by the receiver (as lazy views)."""
    conn.send((mode, per_message, receiver.endpoint))
    assert len(receiver.get_batch(per_message, timeout=120)) == per_message
    started = time.perf_counter()
    got = 0
    while got < total:
        batch = receiver.get_batch(256, timeout=120)
        assert batch, "the producer stopped sending"
        got += len(batch)
    elapsed = time.perf_counter() - started
    conn.recv()
    return elapsed


def bench_trajectories(args: argparse.Namespace) -> None:
    total = args.groups * args.group_size
    print(f"trajectories: {total} = {args.groups} groups x {args.group_size}, prompt {args.prompt_len} + completion "
          f"{args.completion_len} tokens; producer in its own process; raw and ours in alternating rounds, "
          f"medians of {args.repeats}")
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=produce, args=(child_conn, args), daemon=True)
    proc.start()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.rcvhwm = TransportConfig().recv_hwm  # the receiver's options, as above
    pull.maxmsgsize = int(TransportConfig().max_message_mb * 2**20)
    raw_endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        with TrajectoryReceiver(TransportConfig()) as receiver:
            for per_message in (int(x) for x in args.per_message.split(",")):
                nbytes = sum(message_bytes(encode(m)) for m in make_messages(args, per_message))
                num_messages = -(-total // per_message)
                raw_s, list_s, columns_s = [], [], []
                for _ in range(args.repeats):  # alternating, so all see the same share of a noisy machine
                    raw_s.append(time_raw_round(pull, conn, per_message, num_messages, raw_endpoint))
                    list_s.append(time_stream_round(receiver, conn, "list", per_message, total))
                    columns_s.append(time_stream_round(receiver, conn, "columns", per_message, total))
                raw = statistics.median(raw_s)
                print(f"  {per_message:3d} per message ({nbytes / total:5.0f} B/traj): raw pyzmq "
                      f"{nbytes / raw / 1e6:7.1f} MB/s ({raw / num_messages * 1e6:6.1f} us/msg)")
                for name, ours_s in (("list of Trajectory", list_s), ("columnar groups", columns_s)):
                    ours = statistics.median(ours_s)
                    ratio = statistics.median(r / o for r, o in zip(raw_s, ours_s))
                    print(f"      TrajectoryStream/Receiver, {name:18s} {nbytes / ours / 1e6:7.1f} MB/s "
                          f"({total / ours:6.0f} traj/s, {ours / num_messages * 1e6:6.1f} us/msg) | ratio {ratio:.0%} "
                          f"(median of per-round ratios)")
    finally:
        conn.send(None)
        proc.join(timeout=60)
        pull.close(linger=0)
        context.term()


def fake_weights(num_params: int, dtype: torch.dtype, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """`num_params` parameters as [rows, 2048] matrices of up to 4M elements, like a decoder's linear layers."""
    width, chunk = 2048, 2048 * 2048
    weights = []
    for i, start in enumerate(range(0, num_params, chunk)):
        n = min(chunk, num_params - start)
        shape = (n // width, width) if n % width == 0 else (n,)
        weights.append((f"layers.{i}.weight", torch.randn(shape, device=device).to(dtype)))
    return weights


def weights_rank(rank: int, world_size: int, args: argparse.Namespace, init: str | None) -> None:
    use_cuda = torch.cuda.is_available() and not args.cpu
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    group = dist.new_group([0, 1], backend=backend, timeout=timedelta(seconds=600))
    num_params = int(args.params if args.params else (5e8 if use_cuda else 2e7))
    dtype = torch.bfloat16 if use_cuda else torch.float32
    weights = fake_weights(num_params, dtype, device) if rank == 0 else []
    nbytes = num_params * dtype.itemsize
    publish_s, send_s, raw_s = [], [], []
    publisher = WeightPublisher({"sync-0": group}, bucket_mb=args.bucket_mb, timeout_s=600) if rank == 0 else None
    receiver = WeightReceiver(group, src_rank=0, timeout_s=600, name="sync-0") if rank == 1 else None
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [bytes] the raw-broadcast reference
    for version in range(1, args.repeats + 2):  # the first round warms up
        dist.barrier()
        started = time.perf_counter()
        if rank == 0:
            publisher.publish(version, weights)
            publish_s.append(time.perf_counter() - started)
            publisher.wait_idle()
        elif rank == 1:
            got, _ = receiver.receive()
            assert got == version
        if use_cuda:
            torch.cuda.synchronize()
        send_s.append(time.perf_counter() - started)
        dist.barrier()
        started = time.perf_counter()
        broadcast_with_timeout(flat, 0, group, 600, "raw broadcast")
        if use_cuda:
            torch.cuda.synchronize()
        raw_s.append(time.perf_counter() - started)
    if rank == 0:
        publisher.close()
        ours, raw = statistics.median(send_s[1:]), statistics.median(raw_s[1:])
        print(f"weights: {num_params / 1e6:.0f}M params {str(dtype).removeprefix('torch.')} = {nbytes / 1e9:.2f} GB, "
              f"{backend}, bucket {args.bucket_mb} MB, {args.repeats} repeats, medians")
        print(f"  WeightPublisher -> WeightReceiver: {nbytes / ours / 1e9:6.2f} GB/s ({ours * 1e3:.0f} ms; "
              f"publish() returned after {statistics.median(publish_s[1:]) * 1e3:.0f} ms: the snapshot copy)")
        print(f"  one raw dist.broadcast of the same bytes: {nbytes / raw / 1e9:6.2f} GB/s ({raw * 1e3:.0f} ms) "
              f"| ratio {raw / ours:.0%}")
    dist.barrier()
    dist.destroy_process_group()


def bench_weights(args: argparse.Namespace) -> None:
    if "RANK" in os.environ:  # under torchrun
        weights_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(weights_rank, args=(2, args, f"tcp://127.0.0.1:{port}"), nprocs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["trajectories", "weights", "all"], nargs="?", default="all")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--groups", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=1024)
    parser.add_argument("--per-message", default="1,8,64", help="trajectories per push, comma-separated")
    parser.add_argument("--params", type=float, default=None, help="default 0.5e9 on GPU, 2e7 on CPU")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even when a GPU is present")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what in ("trajectories", "all") and "RANK" not in os.environ:
        bench_trajectories(args)
    if args.what in ("weights", "all"):
        bench_weights(args)


if __name__ == "__main__":
    main()
