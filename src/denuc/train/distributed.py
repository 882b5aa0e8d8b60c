"""Data-parallel training under ``torchrun``: one process per GPU, on one or several hosts.

``torchrun --nproc-per-node N [--nnodes M ...] -m denuc train-detector ...`` (or
``train-head``) starts N processes per host with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`distributed` turns them into a process group
(NCCL on CUDA, gloo on the CPU) and gives each process its device (``cuda:LOCAL_RANK``).
Without those variables (a plain ``denuc ...``) nothing is initialised and training runs the
one-process code path unchanged.

What the training loops do with it:

* **Same run as one process.** The configured batch size is the *global* batch: every rank
  draws the same shuffled order (same seed, same random stream; a new permutation each epoch),
  cuts it into the same global batches and takes its contiguous share of each
  (:func:`batch_share`; ``batch / world`` samples, an :class:`InputError` when it does not
  divide). Loss normalisers (point counts, class-weight sums) are summed over the ranks before
  dividing (:func:`sum_across`) and BatchNorm statistics are computed over the global batch
  (:func:`sync_batchnorm`), so the averaged gradient is the gradient of the one-process loss of
  that batch: ``N`` processes train the model one process would, up to float rounding.
  (``torch.utils.data.DistributedSampler`` is not used: it gives each rank its own slice of the
  permutation and pads with repeated samples, so a step would see other samples than a
  one-process step.)
* **One writer.** Logs, checkpoints and ``state.pt`` come from rank 0 (:func:`is_main`);
  checkpoints hold the un-wrapped model's state dict, so ``--resume`` works on any world size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from denuc.core.device import launched_world, rank_device  # noqa: F401  (re-exported)
from denuc.errors import InputError, ModelError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run.

    Attributes:
        rank, world: global rank and number of processes (``(0, 1)`` without torchrun).
        local_rank: rank on this host (picks the GPU).
        backend: ``"nccl"`` or ``"gloo"``; ``None`` when no process group is used.
        cpu_group: a gloo process group for CPU tensors and Python objects (the default group
            itself under gloo); ``None`` without process group.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    cpu_group: Any = None

    @property
    def active(self) -> bool:
        """Several processes train together."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0


#: The context of the running training (set by :func:`distributed`); one process, else.
_CURRENT = DistContext()


def current() -> DistContext:
    """The context set by the innermost active :func:`distributed` (one process outside it)."""
    return _CURRENT


def is_main() -> bool:
    """True in the process that logs and writes: rank 0, or the only process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _CURRENT.is_main


@contextmanager
def distributed(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the data-parallel run this process was started in, for the ``with`` block.

    Args:
        device: the device asked for (e.g. from :func:`denuc.core.device.pick_device`).

    Yields:
        ``(context, device of this process)``. Under ``torchrun`` with ``WORLD_SIZE > 1`` a
        process group is initialised (NCCL when ``device`` is CUDA, else gloo) unless one
        already is, and destroyed on exit if it was made here; each process gets
        ``cuda:LOCAL_RANK``. Otherwise ``(DistContext(), device)`` and nothing happens.
    """
    global _CURRENT
    previous = _CURRENT
    owned = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = launched_world()[2] if "LOCAL_RANK" in os.environ else rank
    else:
        rank, world, local = launched_world()
        if world > 1:
            if not dist.is_available():
                raise ModelError("this PyTorch build has no torch.distributed; cannot train with several processes")
            dev = rank_device(device, local)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                    **({"device_id": dev} if dev.type == "cuda" else {}))
            owned = True
    if world <= 1:
        _CURRENT = DistContext()
        try:
            yield _CURRENT, device
        finally:
            _CURRENT = previous
        return
    dev = rank_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = str(dist.get_backend())
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    _CURRENT = DistContext(rank=rank, world=world, local_rank=local, backend=backend, cpu_group=cpu_group)
    try:
        yield _CURRENT, dev
    finally:
        _CURRENT = previous
        if owned:
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (nothing to wait for with one process)."""
    if ctx.active:
        dist.barrier(group=ctx.cpu_group)


def per_rank_batch(global_batch: int, world: int, what: str = "batch size (--batch-size)") -> int:
    """``global_batch / world``: each rank's share of a global batch.

    Raises:
        InputError: ``global_batch`` is not a multiple of ``world``.
    """
    if global_batch % world:
        raise InputError(f"{what} {global_batch} is the global batch, shared by {world} processes: it must be a "
                         f"multiple of {world} (e.g. {max(world, global_batch // world * world)} or "
                         f"{(global_batch // world + 1) * world})")
    return global_batch // world


def batch_share(items: Sequence[T], ctx: DistContext, per_rank: int) -> list[T]:
    """This rank's contiguous share of one global batch ``items``: ``items[rank * per_rank :
    (rank + 1) * per_rank]``. A short last batch leaves the highest ranks with fewer items or
    none (their empty batch still takes part in the step, contributing nothing)."""
    if not ctx.active:
        return list(items)
    return list(items[ctx.rank * per_rank:(ctx.rank + 1) * per_rank])


def sum_across(ctx: DistContext) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``f(t) -> t`` summed over all ranks (a new tensor; no gradient flows through it), for loss
    normalisers; ``None`` with one process (the loss then normalises as it always did)."""
    if not ctx.active:
        return None

    def f(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=None if out.is_cuda else ctx.cpu_group)
        return out

    return f


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over the ranks (in place; returned)."""
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=None if t.is_cuda else ctx.cpu_group)
    return t


def all_gather_objects(obj: T, ctx: DistContext) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` with one process."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj, group=ctx.cpu_group)
    return out


def broadcast_params(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (in place)."""
    if not ctx.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0, group=None if t.is_cuda else ctx.cpu_group)


def sync_gradients(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Sum the gradients of ``params`` over the ranks, in one flat all-reduce per device.

    For losses already divided by their global normaliser (:func:`sum_across`): the sum of the
    ranks' gradients is then the gradient of the global batch. A parameter without gradient on
    this rank (an empty share) takes part with zeros, so every rank ends with the same gradients.
    """
    if not ctx.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_device: dict[torch.device, list[nn.Parameter]] = {}
    for p in params:
        by_device.setdefault(p.grad.device, []).append(p)  # type: ignore[union-attr]
    for dev, ps in by_device.items():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])  # type: ignore[union-attr]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=None if dev.type == "cuda" else ctx.cpu_group)
        off = 0
        for p in ps:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))  # type: ignore[union-attr]
            off += n


# ------------------------------------------------------------------ BatchNorm over the global batch


class _GlooSyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation over the union of every rank's batch, for CPU tensors (PyTorch's
    ``SyncBatchNorm`` runs on GPUs only). Statistics in float64, two passes (mean, then the
    centred second moment), so they match one-process BatchNorm to float32 rounding."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                momentum: float, group: Any) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        c = x.shape[1]
        xd = x.double()
        buf = torch.cat([xd.sum(dims), torch.tensor([x.numel() / max(c, 1)], dtype=torch.float64)])
        dist.all_reduce(buf, group=group)
        n = float(buf[-1])
        if n < 1:
            raise ValueError("synchronised BatchNorm: every rank's batch is empty")
        mean = buf[:c] / n
        m2 = ((xd - mean.view(shape)) ** 2).sum(dims)
        dist.all_reduce(m2, group=group)
        var = m2 / n
        invstd = 1.0 / torch.sqrt(var + eps)
        xhat = ((xd - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = m2 / max(n - 1.0, 1.0)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.n, ctx.group, ctx.shape, ctx.dims = n, group, shape, dims
        y = xhat
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        shape, dims = ctx.shape, ctx.dims
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        glob = torch.cat([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(glob, group=ctx.group)
        c = sum_dy.numel()
        g_dy, g_dy_xhat = (glob[:c] / ctx.n).to(dy.dtype), (glob[c:] / ctx.n).to(dy.dtype)
        scale = invstd if weight is None else invstd * weight
        dx = scale.view(shape) * (dy - g_dy.view(shape) - xhat * g_dy_xhat.view(shape))
        # parameter gradients of this rank's share (DDP averages them over the ranks, as for
        # every other parameter)
        dw = sum_dy_xhat if weight is not None else None
        db = sum_dy if weight is not None else None
        return dx, dw, db, None, None, None, None, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of a gloo (CPU) process group;
    ordinary BatchNorm in eval mode or without process group. Same parameters, buffers and
    state-dict keys as ``nn.BatchNorm2d`` (checkpoints load into either)."""

    def __init__(self, *args: Any, group: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        if self.momentum is None:  # cumulative moving average, as in _BatchNorm
            factor = 0.0
        else:
            factor = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return _GlooSyncBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if track else None,
                                          self.running_var if track else None, self.eps, factor, self.group)


def _convert_gloo(module: nn.Module, group: Any) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, group=group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_gloo(child, group))
    return out


def sync_batchnorm(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm computing its statistics over the global batch:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlooSyncBatchNorm` on the CPU. The same
    parameter and buffer tensors are kept (an optimizer made before stays valid). Unchanged with
    one process."""
    if not ctx.active:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_gloo(model, ctx.cpu_group)


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` (already on ``device``) with global-batch BatchNorm, wrapped in
    ``DistributedDataParallel``; ``model`` itself with one process. Use :func:`unwrap` for the
    module to save or evaluate."""
    if not ctx.active:
        return model
    model = sync_batchnorm(model, ctx, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index], output_device=device.index)
    return DDP(model, process_group=ctx.cpu_group)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def main_only_log(log: Callable[[str], None], ctx: DistContext) -> Callable[[str], None]:
    """``log`` on rank 0, a no-op on the other ranks."""
    if ctx.is_main:
        return log
    return lambda _msg: None


# ------------------------------------------------------------------ feature extraction shared by the ranks


def extract_shared(extract: Callable[[list[str], list[int]], dict[str, Any]], stems: Sequence[str],
                   mpps: Sequence[float], ctx: DistContext) -> dict[str, Any]:
    """Point features of ``stems``, each rank encoding the images ``stems[rank::world]``.

    Args:
        extract: ``extract(my stems, their positions in stems) -> {kind: PointFeatures}`` (the
            one-process extraction of :mod:`denuc.train.features` on a subset).
        mpps: µm/px of each stem.

    Returns:
        ``{kind: PointFeatures}`` over all ``stems``, points grouped by image in ``stems`` order
        and in each image's own order: exactly what one process extracting every image returns.
        Every rank gets it (gathered through the process group, so hosts need not share a disk).
    """
    import numpy as np

    pos = list(range(ctx.rank, len(stems), ctx.world))
    mine = extract([stems[i] for i in pos], pos) if pos else {}
    gathered = all_gather_objects((pos, mine), ctx)
    out: dict[str, Any] = {}
    for kind in ("gt", "det"):
        parts = [(p, m[kind]) for p, m in gathered if kind in m]
        if not parts:
            continue
        image = np.concatenate([np.asarray(p, np.int32)[f.image] for p, f in parts])
        order = np.argsort(image, kind="stable")

        def cat(field: str, parts: list[tuple[list[int], Any]] = parts, order: np.ndarray = order) -> np.ndarray:
            return np.concatenate([getattr(f, field) for _, f in parts])[order]

        cls = type(parts[0][1])  # PointFeatures (not imported: denuc.train.features imports this module)
        out[kind] = cls(cat("feats"), cat("labels"), image[order].astype(np.int32), cat("xy"),
                                  cat("scores"), list(stems), list(mpps))
    return out


def check_replicas(module: nn.Module, ctx: DistContext, what: str = "model") -> None:
    """Raise :class:`ModelError` unless every rank holds bit-identical parameters and buffers
    in ``module`` (sha256 of their bytes, compared over the ranks): data-parallel training keeps
    the replicas equal, and a difference means the ranks have silently diverged."""
    if not ctx.active:
        return
    import hashlib

    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = all_gather_objects(h.hexdigest(), ctx)
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ModelError(f"data-parallel training: the {what} on rank(s) {bad} differs from rank 0's; the processes "
                         "have diverged (different code, data or non-deterministic collectives)")
