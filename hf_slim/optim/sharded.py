"""Aurora on sharded (DTensor / FSDP2) parameters: every matrix is orthogonalized whole, by one owner rank.

Newton–Schulz needs whole matrices. Applied to a DTensor, the plain update would let DTensor redistribute
implicitly: with FSDP2's ``Shard(0)`` every polar step all-reduces Gram matrices and all-gathers operands,
dozens of collectives per matrix and per step, and every rank repeats the whole computation. Here the
layout is handled on purpose (as microsoft/dion does for Muon):

- whole matrices already local (``Replicate()``, or a fused expert tensor ``[E, m, n]`` sharded on a leading
  dimension, so each rank holds whole experts): updated where they are, no communication;
- a matrix sharded along one of its own two dimensions: one rank *owns* it (owners balanced by the
  Newton–Schulz cost), each rank sends its shard of the momentum-combined gradient (and of the carried row
  correction) to the owner in one ``all_to_all_single`` per process group and dtype, the owner computes the
  update of the whole matrix, and a second ``all_to_all_single`` returns each rank its shard of it.

Per step a rank sends ``2 (W-1)/W²`` of the sharded matrices' elements instead of all-gathering them, and
runs ``1/W`` of the Newton–Schulz work. The result is the unsharded optimizer's update. Supported layouts:
a 1-D device mesh with ``Shard(d)`` (even or uneven chunks, as ``torch.chunk`` splits them) or
``Replicate()``. Anything else (2-D meshes such as HSDP, ``Partial``, strided shards) raises a `ValueError`
naming the parameter and its placements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


__all__ = ["CollectiveCounter", "ShardLayout", "dtensor_layout", "is_dtensor", "local_tensor"]


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor`."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (sharing its storage), or `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def chunk_sizes(n: int, world: int) -> list[int]:
    """Extent of each rank's piece when a dimension of size `n` is split as `torch.chunk` (and DTensor) split it."""
    step = -(-n // world) if n else 0
    return [max(0, min(step, n - r * step)) for r in range(world)]


@dataclass(frozen=True)
class ShardLayout:
    """Where a DTensor parameter's matrices live.

    Attributes:
        mesh: The 1-D `DeviceMesh`.
        group: Its process group.
        rank, world: This rank's index on the mesh and the mesh size.
        dim (`int` or `None`): The sharded tensor dimension (non-negative), `None` for `Replicate()`.
        shape (`tuple[int, ...]`): The global shape.
    """

    mesh: Any
    group: Any
    rank: int
    world: int
    dim: int | None
    shape: tuple[int, ...]

    @property
    def whole_matrices_local(self) -> bool:
        """True when every matrix of the tensor is whole on some rank (replicated, or sharded on a leading dim)."""
        return self.dim is None or self.dim < len(self.shape) - 2

    def sizes(self, dim: int | None = None, shape: Sequence[int] | None = None) -> list[int]:
        """Per-rank extents of `shape[dim]` (defaults: this layout's shard dim and shape)."""
        shape = self.shape if shape is None else shape
        return chunk_sizes(shape[self.dim if dim is None else dim], self.world)


def dtensor_layout(p: torch.Tensor, name: str) -> ShardLayout:
    """Check that Aurora can orthogonalize the DTensor `p` and say where its matrices live.

    Args:
        p (`DTensor`): A parameter of an Aurora group.
        name (`str`): Its name, for the error message.

    Raises:
        `ValueError`: for a layout other than a 1-D mesh with `Shard(d)` or `Replicate()`.
    """
    mesh, placements = p.device_mesh, tuple(p.placements)
    supported = (
        "Aurora orthogonalizes DTensor parameters on a 1-D device mesh with Shard(dim) or Replicate() "
        "(FSDP2's fully_shard default is Shard(0)); put this parameter in a use_aurora=False (AdamW) group or shard "
        "it on a 1-D mesh"
    )
    if mesh.ndim != 1:
        raise ValueError(
            f"parameter {name!r} is a DTensor with placements {placements} on a {mesh.ndim}-D device mesh of shape "
            f"{tuple(mesh.shape)}, a layout Aurora cannot handle: {supported}"
        )
    (pl,) = placements
    if pl.is_replicate():
        dim = None
    elif type(pl) is Shard:
        dim = pl.dim % p.ndim
    else:
        raise ValueError(f"parameter {name!r} is a DTensor with placements {placements}, a layout Aurora cannot handle: {supported}")
    layout = ShardLayout(mesh, mesh.get_group(), mesh.get_local_rank(), mesh.size(), dim, tuple(p.shape))
    local_shape = tuple(p.to_local().shape)
    expected = list(layout.shape)
    if dim is not None:
        expected[dim] = layout.sizes()[layout.rank]
    if local_shape != tuple(expected):
        raise ValueError(
            f"parameter {name!r} is a DTensor with placements {placements} whose local shard has shape {local_shape}, "
            f"not the {tuple(expected)} that torch.chunk gives on rank {layout.rank} of {layout.world}: {supported}"
        )
    return layout


def _narrow_pieces(t: torch.Tensor, dim: int, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(t, list(sizes), dim=dim))


def _piece_shape(shape: Sequence[int], dim: int, n: int) -> list[int]:
    piece = list(shape)
    piece[dim] = n
    return piece


@dataclass
class RemoteJob:
    """One matrix-sharded unit of work (a parameter, or a LoRA pair) computed whole on its owner.

    Attributes:
        owner (`int`): Rank that computes it.
        inputs (`list[tuple[Tensor, int, tuple]]`): `(local piece, shard dim, global shape)` for each input; dtypes
            are the same on every rank.
        outputs (`list[tuple[int, tuple, torch.dtype]]`): `(shard dim, global shape, dtype)` of each output, known on
            every rank.
        key (`Any`): Caller's reference (the parameter).
        cost (`float`): Relative compute cost, for balancing owners.
    """

    owner: int
    inputs: list[tuple[torch.Tensor, int, tuple[int, ...]]]
    outputs: list[tuple[int, tuple[int, ...], torch.dtype]]
    key: Any = None
    cost: float = 0.0


_ALIGN = 8  # bytes: every piece starts aligned, so a byte buffer can be viewed back as any dtype


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return -(-n // _ALIGN) * _ALIGN


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    b = t.contiguous().reshape(-1).view(torch.uint8)
    pad = -b.numel() % _ALIGN
    return torch.nn.functional.pad(b, (0, pad)) if pad else b


class OwnerExchange:
    """Moves the pieces of `RemoteJob`s to their owners and the results back: one `all_to_all_single` each way.

    Pieces of any dtype travel in one byte buffer. All jobs of one exchange share a process group; every rank
    must build the same jobs in the same order (they follow the optimizer's parameter order, the same on every rank).
    """

    def __init__(self, group: Any, rank: int, world: int, stats: dict[str, int]) -> None:
        self.group, self.rank, self.world, self.stats = group, rank, world, stats

    def _all_to_all(self, send: list[list[torch.Tensor]], recv_sizes: list[int]) -> list[torch.Tensor]:
        flat = [torch.cat([_as_bytes(t) for t in pieces]) if pieces else torch.empty(0, dtype=torch.uint8) for pieces in send]
        send_sizes = [f.numel() for f in flat]
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8)
        dist.all_to_all_single(out, torch.cat(flat), recv_sizes, send_sizes, group=self.group)
        # What crosses the wire: the piece a rank keeps for itself is not counted.
        self.stats["bytes_sent"] += sum(send_sizes) - send_sizes[self.rank]
        self.stats["bytes_received"] += sum(recv_sizes) - recv_sizes[self.rank]
        self.stats["collectives"] += 1
        return list(torch.split(out, recv_sizes))

    def gather(self, jobs: Sequence[RemoteJob]) -> list[list[torch.Tensor]]:
        """Full inputs of the jobs this rank owns, in job order."""
        send: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        recv_sizes = [0] * self.world
        for job in jobs:
            for local, dim, shape in job.inputs:
                send[job.owner].append(local)
                if job.owner == self.rank:
                    for r, n in enumerate(chunk_sizes(shape[dim], self.world)):
                        recv_sizes[r] += _nbytes(_piece_shape(shape, dim, n), local.dtype)
        received = self._all_to_all(send, recv_sizes)
        offsets = [0] * self.world
        full: list[list[torch.Tensor]] = []
        for job in jobs:
            if job.owner != self.rank:
                continue
            tensors = []
            for local, dim, shape in job.inputs:
                parts = []
                for r, n in enumerate(chunk_sizes(shape[dim], self.world)):
                    piece_shape = _piece_shape(shape, dim, n)
                    size = _nbytes(piece_shape, local.dtype)
                    numel = math.prod(piece_shape)
                    parts.append(received[r][offsets[r] : offsets[r] + size].view(local.dtype)[:numel].view(piece_shape))
                    offsets[r] += size
                tensors.append(torch.cat(parts, dim=dim))
            full.append(tensors)
        return full

    def scatter(self, jobs: Sequence[RemoteJob], results: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Every job's output pieces for this rank, given the full outputs of the jobs it owns (in job order)."""
        send: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        owned = iter(results)
        recv_sizes = [0] * self.world
        for job in jobs:
            if job.owner == self.rank:
                for out, (dim, shape, dtype) in zip(next(owned), job.outputs):
                    for r, piece in enumerate(_narrow_pieces(out.to(dtype), dim, chunk_sizes(shape[dim], self.world))):
                        send[r].append(piece)
            for dim, shape, dtype in job.outputs:
                recv_sizes[job.owner] += _nbytes(_piece_shape(shape, dim, chunk_sizes(shape[dim], self.world)[self.rank]), dtype)
        received = self._all_to_all(send, recv_sizes)
        offsets = [0] * self.world
        pieces: list[list[torch.Tensor]] = []
        for job in jobs:
            mine = []
            for dim, shape, dtype in job.outputs:
                piece_shape = _piece_shape(shape, dim, chunk_sizes(shape[dim], self.world)[self.rank])
                size, o = _nbytes(piece_shape, dtype), offsets[job.owner]
                mine.append(received[job.owner][o : o + size].view(dtype)[: math.prod(piece_shape)].view(piece_shape))
                offsets[job.owner] += size
            pieces.append(mine)
        return pieces


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: largest cost first to the least-loaded rank (ties to the lower index, rank)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def polar_cost(shape: Sequence[int]) -> float:
    """Newton–Schulz work of a `[..., m, n]` tensor, up to a constant: batch · s² · (2 l + s), s ≤ l its sides."""
    m, n = shape[-2], shape[-1]
    s, l = min(m, n), max(m, n)
    return math.prod(shape[:-2]) * s * s * (2 * l + s)


def dtensor_like(local: torch.Tensor, layout: ShardLayout, shape: Sequence[int], dim: int | None) -> torch.Tensor:
    """A DTensor on `layout`'s mesh from this rank's `local` piece of a tensor of global `shape` sharded on `dim`."""
    placements = [Replicate() if dim is None else Shard(dim)]
    stride = torch.empty(tuple(shape), device="meta").stride()
    return DTensor.from_local(local, layout.mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


# --------------------------------------------------------------------------------------------------
# Counting what collectives move (benchmarks, tests)
# --------------------------------------------------------------------------------------------------

_SENT_FACTOR = {
    # Bytes a rank sends per byte of the op's tensor argument, for ring algorithms on W ranks.
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "allreduce_": lambda w: 2 * (w - 1) / w,
    "all_gather_into_tensor": lambda w: (w - 1),  # argument: the local shard
    "_allgather_base_": lambda w: (w - 1) / w,  # argument: the output
    "allgather_": lambda w: (w - 1) / w,
    "reduce_scatter_tensor": lambda w: (w - 1) / w,
    "_reduce_scatter_base_": lambda w: (w - 1) / w,
    "broadcast": lambda w: 1.0,
    "broadcast_": lambda w: 1.0,
}


class CollectiveCounter(TorchDispatchMode):
    """Context manager counting the collectives dispatched inside it and the bytes this rank sends.

    It sees DTensor's implicit redistributions (functional collectives) and explicit `torch.distributed`
    calls alike. Bytes are what a rank sends with ring algorithms: all-reduce `2(W-1)/W·S`, all-gather
    `(W-1)·shard`, reduce-scatter `(W-1)/W·S`, all-to-all the pieces for other ranks (measured exactly).

    Args:
        world (`int`): Size of the process group the collectives run on (one group; the all-to-all piece a rank
            keeps is found by its global rank).

    Attributes:
        counts (`dict[str, int]`): Calls per collective op name.
        bytes_sent (`float`): Estimated bytes this rank sent.
    """

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.counts: dict[str, int] = {}
        self.bytes_sent = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if DTensor is not None and any(t is DTensor or (isinstance(t, type) and issubclass(t, DTensor)) for t in types):
            # Let DTensor desugar the op into local ops and collectives first; we see those next.
            return NotImplemented
        ns = func.namespace
        if ns in ("_c10d_functional", "c10d_functional", "c10d"):
            name = func._opname
            if not name.startswith("_wrap") and name not in ("wait_tensor", "barrier", "monitored_barrier"):
                self.counts[name] = self.counts.get(name, 0) + 1
                self.bytes_sent += self._bytes(name, args)
        return func(*args, **kwargs)

    def _bytes(self, name: str, args: tuple) -> float:
        def nbytes(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, (list, tuple)):
                return sum(nbytes(y) for y in x)
            return 0

        w = self.world
        if name in ("all_to_all_single", "alltoall_base_"):
            # c10d: (out, in, group, out_splits, in_splits, ...); funcol: (in, out_splits, in_splits, group).
            t = args[1] if name == "alltoall_base_" else args[0]
            splits = args[4] if name == "alltoall_base_" else args[2]  # input (send) split sizes
            rank = dist.get_rank()
            per = t.element_size() * (t.numel() // max(t.shape[0], 1)) if t.ndim else t.element_size()
            splits = list(splits) if splits else [t.shape[0] // w] * w
            return float(per * (sum(splits) - splits[rank % len(splits)]))
        if name in ("_allgather_base_",):
            return _SENT_FACTOR[name](w) * nbytes(args[0])
        if name in _SENT_FACTOR:
            return _SENT_FACTOR[name](w) * nbytes(args[0])
        return float(nbytes(args[0]))
