"""Which device a process runs on: the device asked for (or the best available) and, under
``torchrun``, this process's rank, world size and GPU.

Inference (:class:`denuc.pipeline.DeNuC`, :class:`denuc.detect.api.Detector`, ``denuc
predict``) and training (:mod:`denuc.train`) both use these, so that inference never imports
the training code.
"""

from __future__ import annotations

import os

import torch

from denuc.errors import InputError, ModelError


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given (``cpu``, ``cuda``, ``cuda:N`` or ``mps``), else the first of cuda, mps,
    cpu that is available. Raises :class:`~denuc.errors.ModelError` for an unknown device or one
    this machine does not have."""
    if name:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise ModelError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0:
                raise ModelError(f"device {name!r}: no CUDA GPU is available to PyTorch on this machine; "
                                 "use --device cpu")
            if dev.index is not None and dev.index >= n:
                raise ModelError(f"device {name!r}: this machine has {n} CUDA GPU(s) (cuda:0 to cuda:{n - 1})")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                      and torch.backends.mps.is_available()):
            raise ModelError(f"device {name!r}: Apple MPS is not available on this machine; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def launched_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the variables ``torchrun`` sets; ``(0, 1, 0)``
    when they are absent. Raises :class:`InputError` for values that are not consistent."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, "
                         f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}: expected whole numbers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank``: ``cuda:LOCAL_RANK`` when ``device`` is a
    CUDA device (one GPU per process), else ``device``."""
    if device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ModelError(f"local rank {local_rank} needs GPU cuda:{local_rank}, but this host has {n} GPU(s); "
                         f"start at most {n} processes per host (torchrun --nproc-per-node {n})")
    return torch.device("cuda", local_rank)


def process_device(name: str | None) -> torch.device:
    """The device this process uses: ``name`` (default: cuda, then mps, then cpu); under torchrun
    a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    dev = pick_device(name)
    if name is not None and ":" in str(name):
        return dev
    return rank_device(dev, launched_world()[2])
