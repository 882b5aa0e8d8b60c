"""Encoders: registry, tiny models of each family saved/loaded as file and folder, offline, errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from denuc.encode import ENCODERS, build_encoder, get_spec
from denuc.encode.tiny import register_tiny
from denuc.encode.weights import file_sha256
from denuc.errors import DenucError, ModelError

TINY = register_tiny()


def _save(enc: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in enc.body.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def test_registry_lists_fms_and_refuses_unknown() -> None:
    for n in ("uni2-h", "uni", "virchow2", "h-optimus-0", "h-optimus-1", "phikon-v2", "efficientnet-lite0"):
        assert n in ENCODERS
    s = get_spec("uni2-h")
    assert (s.dim, s.stride, s.num_prefix_tokens, s.hub_id) == (1536, 14, 9, "MahmoodLab/UNI2-h")
    assert get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_spec("timm:vit_small_patch16_224").dim == 384
    with pytest.raises(DenucError, match="known: .*uni2-h"):
        build_encoder("no-such-encoder")


@pytest.mark.parametrize("name", TINY)
def test_tiny_family_roundtrip_file_and_folder(name: str, tmp_path: Path) -> None:
    enc = build_encoder(name, weights="random")
    x = torch.randn(2, 3, enc.input_size, enc.input_size)
    ref = enc(x)
    h = enc.map_size()
    assert ref.shape == (2, enc.dim, h, h)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    f = _save(enc, tmp_path / "w.safetensors")
    folder = tmp_path / "folder"
    _save(enc, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))
    pth = _save(enc, tmp_path / "w.pth")
    for src in (f, folder, pth):
        e2 = build_encoder(name, weights=src)
        torch.testing.assert_close(e2(x), ref)
    assert build_encoder(name, weights=f).weights_hash == file_sha256(f)


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    f = _save(build_encoder("tiny-uni", weights="random"), tmp_path / "uni.safetensors")
    with pytest.raises(ModelError, match="do not fit"):
        build_encoder("tiny-uni2h", weights=f)
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(ModelError, match="cannot read weights"):
        build_encoder("tiny-uni", weights=bad)
    with pytest.raises(ModelError, match="no such file"):
        build_encoder("tiny-uni", weights=str(tmp_path / "missing.pth"))


def test_offline_makes_no_network_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "local"
    ref = build_encoder("tiny-uni", weights="random")
    _save(ref, folder / "model.safetensors")

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("network access attempted in offline mode")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    enc = build_encoder("tiny-uni", weights=folder)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(enc(x), ref(x))
    with pytest.raises(ModelError, match="offline"):
        build_encoder("uni", weights="hf-hub:MahmoodLab/uni")
    with pytest.raises(ModelError, match="offline"):
        build_encoder("uni")  # default weights come from the hub


def test_gated_repo_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a: object, **k: object) -> str:
        from unittest.mock import MagicMock

        raise GatedRepoError("403 gated", response=MagicMock(headers={}))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelError, match="request access.*HF_TOKEN"):
        build_encoder("uni2-h", offline=False)


def test_efficientnet_lite0_dense_map() -> None:
    enc = build_encoder("efficientnet-lite0")
    out = enc(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 40 + 112 + 320, 8, 8) and enc.stride == 8 and enc.dim == 472
    assert len(enc.weights_hash) == 64


def test_phikon_family_loads_a_local_transformers_folder(tmp_path: Path) -> None:
    folder = tmp_path / "phikon"
    try:
        from transformers import ViTConfig, ViTModel
    except ImportError:
        folder.mkdir()
        save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
        with pytest.raises(ModelError, match="pip install transformers"):
            build_encoder("phikon-v2", weights=folder)
        return
    cfg = ViTConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=64, patch_size=16)  # phikon-v2's width and patch (checked on load)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    enc = build_encoder("phikon-v2", weights=folder)
    assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 1024, 4, 4)
