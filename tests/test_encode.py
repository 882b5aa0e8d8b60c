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
    assert (s.width, s.stride, s.num_prefix_tokens, s.hub_id) == (1536, 14, 9, "MahmoodLab/UNI2-h")
    assert get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    t = get_spec("timm:vit_small_patch16_224")  # 12 blocks of 384 channels
    assert (t.width, t.depth, t.taps, t.dim) == (384, 12, ("b-1",), 384)
    q = get_spec("timm:vit_small_patch16_224", variant="quarters")
    assert (q.taps, q.dim) == (("b-10", "b-7", "b-4", "b-1"), 4 * 384)
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
    enc = build_encoder("efficientnet-lite0", variant="s8-s32@0.25")
    out = enc(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 40 + 112 + 320, 8, 8) and enc.stride == 8 and enc.dim == 472
    assert len(enc.weights_hash) == 64


def test_lite0_fine_taps_lie_on_the_finest_grid_and_coarse_ones_match() -> None:
    """s2..s32 concatenated on the stride-2 grid: the s2 level is the first block's output itself,
    the s8 level there is the s8-grid map upsampled, the s32 level the same in both."""
    import torch.nn.functional as F

    fine = build_encoder("efficientnet-lite0", taps="s2,s4,s8,s16,s32")
    coarse = build_encoder("efficientnet-lite0", taps=("s8", "s16", "s32"))
    assert (fine.dim, fine.stride, coarse.dim, coarse.stride) == (512, 2, 472, 8)
    x = torch.rand(1, 3, 64, 64)
    f, c = fine(x), coarse(x)
    assert f.shape == (1, 512, 32, 32) and c.shape == (1, 472, 8, 8)
    m = fine.body
    torch.testing.assert_close(f[:, :16], m.blocks[0](m.bn1(m.conv_stem(x))))
    torch.testing.assert_close(f[:, 40:80], F.interpolate(c[:, :40], size=(32, 32), mode="bilinear",
                                                          align_corners=False))
    torch.testing.assert_close(f[:, 192:].mean((2, 3)), c[:, 152:].mean((2, 3)), rtol=1e-4, atol=1e-4)
    assert fine.variant() == {"taps": ["s2", "s4", "s8", "s16", "s32"]} != coarse.variant()


def test_encoder_variants_set_taps_and_working_mpp() -> None:
    from denuc.encode.specs import LITE0_LEGACY

    spec = get_spec("efficientnet-lite0")
    assert spec.default_variant in spec.variants and spec.legacy_taps == LITE0_LEGACY.taps == ("s8", "s16", "s32")
    for name, v in spec.variants.items():
        s = get_spec("efficientnet-lite0", variant=name)
        assert (s.taps, s.mpp) == (v.taps, v.mpp) and s.variant_name(s.taps, s.mpp) == name
    assert get_spec("efficientnet-lite0", variant="s4-s32@0.5").stride == 4
    with pytest.raises(ModelError, match="no variant 'nope'; known: s8-s32@0.25"):
        build_encoder("efficientnet-lite0", variant="nope")
    with pytest.raises(ModelError, match=r"unknown efficientnet-lite0 taps \['s1'\]; known: \['s2'"):
        build_encoder("efficientnet-lite0", taps="s1,s8")
    with pytest.raises(ModelError, match="name a level twice"):
        get_spec("efficientnet-lite0", taps="s8,s8")
    for n in ("uni2-h", "uni", "virchow2", "h-optimus-0", "phikon-v2"):  # ViT FMs: the last block (the paper's)
        s = get_spec(n)
        assert s.taps == ("b-1",) and s.dim == s.width and s.legacy_taps == ("b-1",)
        q = get_spec(n, variant="quarters")  # + intermediate blocks on request
        assert q.taps[-1] == "b-1" and len(q.taps) == 4 and q.dim == 4 * s.width
    assert get_spec("uni2-h", variant="quarters").taps == ("b-19", "b-13", "b-7", "b-1")  # blocks 6, 12, 18, 24


@pytest.mark.parametrize("name", TINY)
def test_vit_taps_concatenate_normed_block_tokens(name: str) -> None:
    """ViT quarter taps = intermediate + last block; the last-block part is the legacy map, the
    intermediate part timm's normed intermediate tokens; taps out of the model's depth are refused."""
    enc = build_encoder(name, weights="random", variant="quarters")
    last = build_encoder(name, weights="random", variant="last")
    first = build_encoder(name, weights="random", taps="b0")
    x = torch.randn(2, 3, enc.input_size, enc.input_size)
    both, only_last, only_first = enc(x), last(x), first(x)
    assert enc.taps == ("b-2", "b-1") and both.shape[1] == enc.dim == 2 * last.dim == 64
    torch.testing.assert_close(both[:, 32:], only_last)
    torch.testing.assert_close(both[:, :32], only_first)
    ref = enc.body.forward_intermediates(x, indices=[0], output_fmt="NCHW", intermediates_only=True, norm=True)[0]
    torch.testing.assert_close(only_first, ref)
    swapped = build_encoder(name, weights="random", taps="b-1,b0")
    torch.testing.assert_close(swapped(x), torch.cat([only_last, only_first], 1))
    with pytest.raises(ModelError, match="it has 2 blocks"):
        build_encoder(name, weights="random", taps="b2")
    with pytest.raises(ModelError, match="ViT taps are b<i>"):
        build_encoder(name, weights="random", taps="s8")


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
    enc = build_encoder("phikon-v2", weights=folder, variant="last")
    x = torch.randn(2, 3, 64, 64)
    assert enc(x).shape == (2, 1024, 4, 4)
    torch.testing.assert_close(enc(x), enc.body(pixel_values=x).last_hidden_state[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4))
    with pytest.raises(ModelError, match=r"tap 'b-19' needs a block the model does not have \(it has 1 blocks"):
        build_encoder("phikon-v2", weights=folder, variant="quarters")  # these taps need phikon-v2's 24 blocks
    # block 0 = last block here: through the final layer norm, like last_hidden_state
    torch.testing.assert_close(build_encoder("phikon-v2", weights=folder, taps="b0")(x), enc(x))


def test_phikon_intermediate_blocks_pass_the_final_norm(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=16)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "m")
    enc = build_encoder("phikon-v2", weights=tmp_path / "m", taps="b0,b1")
    x = torch.randn(1, 3, 32, 32)
    out = enc.body(pixel_values=x, output_hidden_states=True)
    want0 = enc.body.layernorm(out.hidden_states[1])[:, 1:].transpose(1, 2).reshape(1, -1, 2, 2)
    want1 = out.last_hidden_state[:, 1:].transpose(1, 2).reshape(1, -1, 2, 2)
    torch.testing.assert_close(enc(x), torch.cat([want0, want1], 1))
