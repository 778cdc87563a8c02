"""Packing named weight tensors into flat per-dtype buckets, and the header that describes them.

The learner's export yields (name, full tensor) one at a time (it gathers ZeRO-3 parameters in
pieces). `pack_weights` copies each into the open bucket of its dtype, sized ~`bucket_bytes`; a
tensor larger than that gets a bucket of its own. The copy is the snapshot the broadcast threads
send from while training goes on. The header (msgpack) lists each bucket's dtype and length and each
tensor's name, shape and offset, so receivers need no prior knowledge of the model: they learn the
header's length from a fixed-size int64 tensor [MAGIC, version, header_bytes, num_buckets], then the
header, then receive each bucket and cut it back into named views.

Versions after the first usually have the same names, dtypes and shapes in the same order, so
`pack_weights_into` copies them straight into the buckets of an earlier snapshot (no allocation, no
page faults on fresh memory); the first tensor that differs sends it back to packing afresh.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable

import msgpack
import torch

MAGIC = 0x41475250  # "AGRP": guards against a broadcast from some other protocol on the group
META_LEN = 4  # [MAGIC, version, header_bytes, num_buckets]
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool)
}


@dataclass
class Bucket:
    """A flat tensor of one dtype holding several weights back to back."""

    dtype: torch.dtype
    data: torch.Tensor  # [numel] of dtype
    entries: list[tuple[str, list[int], int]] = field(default_factory=list)  # (name, shape, element offset)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"weight dtype {dtype}: expected one of {sorted(_DTYPES)}")
    return name


def pack_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, device: torch.device | str = "cpu"
) -> list[Bucket]:
    """Copy the tensors into per-dtype buckets on `device`, in the order buckets fill up."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes = {bucket_bytes}: expected >= 1")
    open_buckets: dict[torch.dtype, tuple[Bucket, int]] = {}  # dtype -> (bucket, elements used)
    done: list[Bucket] = []
    seen: set[str] = set()

    def close(dtype: torch.dtype) -> None:
        bucket, used = open_buckets.pop(dtype)
        bucket.data = bucket.data[:used]  # the unused tail is at most one tensor's size
        done.append(bucket)

    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in the export: expected unique names")
        seen.add(name)
        _dtype_name(tensor.dtype)
        numel = tensor.numel()
        if tensor.dtype in open_buckets:
            bucket, used = open_buckets[tensor.dtype]
            if used + numel > bucket.data.numel():
                close(tensor.dtype)
        if tensor.dtype not in open_buckets:
            capacity = max(numel, bucket_bytes // tensor.element_size(), 1)
            open_buckets[tensor.dtype] = (Bucket(tensor.dtype, torch.empty(capacity, dtype=tensor.dtype, device=device)), 0)
        bucket, used = open_buckets[tensor.dtype]
        bucket.data[used : used + numel].view(tensor.shape).copy_(tensor.detach())
        bucket.entries.append((name, list(tensor.shape), used))
        open_buckets[tensor.dtype] = (bucket, used + numel)
    for dtype in list(open_buckets):
        close(dtype)
    return done


@dataclass(eq=False)  # identity: the publisher counts the users of each buffer set
class PackedWeights:
    """Buckets holding one export, and where each tensor went in export order (to refill them in place)."""

    buckets: list[Bucket]
    slots: list[tuple[str, torch.dtype, torch.Size, torch.Tensor]]  # (name, dtype, shape, view into a bucket)

    @classmethod
    def of(cls, buckets: list[Bucket], order: list[str]) -> "PackedWeights":
        views = {}
        for bucket in buckets:
            for name, shape, offset in bucket.entries:
                views[name] = bucket.data[offset : offset + math.prod(shape)].view(shape)
        return cls(buckets, [(name, views[name].dtype, views[name].shape, views[name]) for name in order])


def pack_weights_into(
    named_tensors: Iterable[tuple[str, torch.Tensor]], reuse: PackedWeights | None, bucket_bytes: int,
    device: torch.device | str = "cpu",
) -> PackedWeights:
    """Pack like `pack_weights`, into `reuse`'s buckets when the export has exactly its layout.

    Returns `reuse` itself when every tensor matched its slot, otherwise freshly allocated buckets.
    Tensors already copied before a mismatch are packed again from the reused buckets, so an export
    that is a one-pass generator (gathered pieces) is never iterated twice.
    """
    tensors = iter(named_tensors)
    if reuse is not None:
        filled = 0
        for name, tensor in tensors:
            if filled < len(reuse.slots):
                slot_name, dtype, shape, view = reuse.slots[filled]
                if name == slot_name and tensor.dtype == dtype and tensor.shape == shape:
                    view.copy_(tensor.detach())
                    filled += 1
                    continue
            done = [(slot[0], slot[3]) for slot in reuse.slots[:filled]]
            return _pack_fresh(itertools.chain(done, [(name, tensor)], tensors), bucket_bytes, device)
        if filled == len(reuse.slots):
            return reuse
        return _pack_fresh([(slot[0], slot[3]) for slot in reuse.slots[:filled]], bucket_bytes, device)
    return _pack_fresh(tensors, bucket_bytes, device)


def _pack_fresh(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                device: torch.device | str) -> PackedWeights:
    order: list[str] = []

    def recorded() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            order.append(name)
            yield name, tensor

    return PackedWeights.of(pack_weights(recorded(), bucket_bytes, device), order)


def encode_header(version: int, buckets: list[Bucket]) -> bytes:
    return msgpack.packb(
        {
            "version": version,
            "buckets": [
                {"dtype": _dtype_name(b.dtype), "numel": b.data.numel(), "tensors": b.entries} for b in buckets
            ],
        },
        use_bin_type=True,
    )


@dataclass(frozen=True)
class BucketSpec:
    dtype: torch.dtype
    numel: int
    entries: list[tuple[str, tuple[int, ...], int]]


def decode_header(data: bytes, version: int, num_buckets: int) -> list[BucketSpec]:
    """Parse and check a header against the meta tensor's version and bucket count."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several types for garbage
        raise ValueError(f"weight header is not valid msgpack ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.get("version") != version:
        raise ValueError(f"weight header version {header.get('version') if isinstance(header, dict) else header!r}: "
                         f"expected {version} (from the meta tensor)")
    buckets = header.get("buckets")
    if not isinstance(buckets, list) or len(buckets) != num_buckets:
        raise ValueError(f"weight header lists {len(buckets) if isinstance(buckets, list) else buckets!r} buckets: "
                         f"expected {num_buckets}")
    specs = []
    for i, raw in enumerate(buckets):
        if not isinstance(raw, dict) or raw.get("dtype") not in _DTYPES or type(raw.get("numel")) is not int:
            raise ValueError(f"weight header bucket {i} = {raw!r:.200}: expected dtype, numel, tensors")
        entries = []
        tensors = raw.get("tensors")
        if not isinstance(tensors, list) or not all(
            isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], list)
            and all(type(d) is int and d >= 0 for d in t[1]) and type(t[2]) is int
            for t in tensors
        ):
            raise ValueError(f"weight header bucket {i} tensors = {tensors!r:.200}: expected [name, shape, offset] entries")
        for name, shape, offset in tensors:
            end = offset + math.prod(shape)
            if not 0 <= offset <= end <= raw["numel"]:
                raise ValueError(f"weight {name!r} spans [{offset}, {end}) outside bucket {i} of {raw['numel']} elements")
            entries.append((name, tuple(shape), offset))
        specs.append(BucketSpec(_DTYPES[raw["dtype"]], raw["numel"], entries))
    return specs


def unpack_buckets(specs: list[BucketSpec], datas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named views into the received buckets (no copy)."""
    weights: dict[str, torch.Tensor] = {}
    for spec, data in zip(specs, datas):
        for name, shape, offset in spec.entries:
            weights[name] = data[offset : offset + math.prod(shape)].view(shape)
    return weights
