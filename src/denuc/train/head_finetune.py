"""Updating the encoder together with the head: ``full`` fine-tuning and ``lora`` (ViTs).

Starting point: the linear/MLP head already fitted on cached frozen features. Each epoch
visits every training image once: the image is tiled exactly as at inference
(:class:`~denuc.query.PointFeaturizer`), every window that owns GT points is encoded *with
gradients*, the features are sampled at those points and the head's cross-entropy is
back-propagated into encoder (lr ``FinetuneConfig.lr``) and head (``head_lr``), AdamW. The
encoder stays in eval mode (frozen BatchNorm statistics, no dropout). After each epoch the
val score is recomputed with the updated encoder (no cache) and the best epoch, including
the frozen starting point (epoch 0), is kept.

LoRA (``peft``) adapts the ``qkv`` projections of ViT encoders; it does not apply to CNN
encoders such as efficientnet-lite0 and is refused for them. The checkpoint stores only the
encoder tensors that differ from the base weights (LoRA merged into them).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from denuc.classify.head import PointHead
from denuc.core.checks import check_int, check_number, plain_number
from denuc.data.base import PointDataset
from denuc.encode.encoder import Encoder, ViTEncoder
from denuc.encode.weights import state_dict_sha256
from denuc.errors import InputError, ModelError
from denuc.query.predictor import PointFeaturizer
from denuc.train.distributed import DistContext
from denuc.train.head import HeadTrainConfig, Scorer, class_weight_tensor


@dataclass
class FinetuneConfig:
    """Encoder-update settings (``lora`` and ``full`` modes)."""

    epochs: int = 3
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_windows: int = 8
    lora_rank: int = 8
    lora_alpha: int = 16
    max_images: int | None = None  # per epoch (None = all train images)

    def check(self) -> FinetuneConfig:
        """Raise :class:`InputError` for a setting that cannot fine-tune; return self."""
        check_int(self.epochs, 1, "fine-tuning epochs (--ft-epochs)")
        check_number(self.lr, "encoder learning rate (--ft-lr)", low=0.0, low_open=True)
        check_number(self.head_lr, "head learning rate of fine-tuning", low=0.0, low_open=True)
        check_number(self.weight_decay, "fine-tuning weight decay", low=0.0)
        check_int(self.batch_windows, 1, "windows per fine-tuning batch")
        check_int(self.lora_rank, 1, "LoRA rank (--lora-rank)")
        check_number(self.lora_alpha, "LoRA alpha", low=0.0, low_open=True)
        if self.max_images is not None:
            check_int(self.max_images, 1, "images per fine-tuning epoch")
        return self


def check_lora_applies(enc: Encoder) -> None:
    """Raise :class:`ModelError` unless ``enc`` is a ViT with ``qkv`` projections."""
    if not isinstance(enc, ViTEncoder):
        raise ModelError(f"LoRA does not apply to {enc.name} (a CNN / non-timm-ViT encoder); it adapts ViT "
                         "attention projections. Use --mode full to fine-tune it, or linear/mlp.")


def _apply_lora(enc: Encoder, cfg: FinetuneConfig) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("--mode lora needs the 'peft' package: pip install peft") from None
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=["qkv"], lora_dropout=0.0, bias="none")
    enc.body = get_peft_model(enc.body, lcfg)


def _merged_body(enc: Encoder, mode: str) -> torch.nn.Module:
    return enc.body.merge_and_unload() if mode == "lora" else enc.body


def _parallel_step(enc: Encoder, fz: PointFeaturizer, head: PointHead, mine: list[tuple[Any, np.ndarray, Any]],
                   labels: torch.Tensor, y_all: torch.Tensor, weight: torch.Tensor | None, opt: torch.optim.Optimizer,
                   trained: list[torch.nn.Parameter], ctx: DistContext) -> float:
    """One data-parallel fine-tuning step: this rank's windows ``mine`` of a batch whose labels
    are ``y_all``. Returns this rank's share of the batch loss (the shares add up to it)."""
    from denuc.train.distributed import sync_gradients

    valid = y_all[y_all >= 0]
    den = float(weight[valid].sum()) if weight is not None else float(len(valid))
    opt.zero_grad(set_to_none=True)
    share = 0.0
    if mine:
        maps = enc(fz.prepare(torch.stack([fz.crop(k) for k, _, _ in mine])))
        feats = torch.cat([fz.sample(m, local) for m, (_, _, local) in zip(maps, mine)])
        y = torch.cat([labels[torch.from_numpy(sel)] for _, sel, _ in mine])
        logits = head(feats.float())
        w = None if weight is None else weight.to(logits.device)
        loss = F.cross_entropy(logits, y.to(logits.device), weight=w, ignore_index=-1, reduction="sum") / den
        loss.backward()
        share = float(loss.detach())
    sync_gradients(trained, ctx)
    opt.step()
    return share


def finetune_encoder(fz: PointFeaturizer, ds: PointDataset, train: list[str], head: PointHead,
                     start_scores: dict[str, float], mode: str, fcfg: FinetuneConfig, hcfg: HeadTrainConfig,
                     make_val_scorer: Callable[[], Scorer], log: Callable[[str], None] = print,
                     ) -> tuple[PointHead, dict[str, float], dict[str, torch.Tensor], str]:
    """Fine-tune ``fz.encoder`` (in place) and ``head`` on window crops of ``train`` images.

    Returns:
        ``(head, val scores, encoder tensors differing from the base weights, their hash)``.
        When no epoch beats the frozen start the encoder is restored and no tensors are returned.

    In a data-parallel run (:mod:`denuc.train.distributed`) every process walks the same
    images and batches of windows and encodes its contiguous share of each batch
    (``ceil(batch_windows / world)`` windows); the loss is normalised by the whole batch's
    (class-weighted) point count and the gradients are summed over the processes, so each step
    is the one-process step.
    """
    from denuc.train.distributed import all_reduce_sum, broadcast_params, check_replicas, current

    ctx = current()
    if mode not in ("lora", "full"):
        raise InputError(f"finetune mode must be lora or full; got {mode!r}")
    fcfg.check()
    enc = fz.encoder
    base = {k: v.detach().clone() for k, v in enc.body.state_dict().items()}
    if mode == "lora":
        check_lora_applies(enc)
        _apply_lora(enc, fcfg)
        broadcast_params(enc.body, ctx)  # the LoRA matrices start from rank 0's random draw
    else:
        for p in enc.body.parameters():
            p.requires_grad_(True)
    enc.eval()
    params = [p for p in enc.body.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    log(f"{mode} fine-tuning of {enc.name}: {n_train / 1e6:.2f}M trainable encoder parameters, "
        f"{fcfg.epochs} epoch(s), lr {fcfg.lr}")
    opt = torch.optim.AdamW([{"params": params, "lr": fcfg.lr},
                             {"params": list(head.net.parameters()), "lr": fcfg.head_lr}],
                            weight_decay=fcfg.weight_decay)
    all_ids = np.concatenate([ds.points(s).class_ids for s in train])
    # "sampled" balancing applies to the cached-feature epochs only; encoder updates visit every image once
    weight = class_weight_tensor(all_ids[all_ids >= 0], len(ds.classes),
                                 "auto" if hcfg.balance == "weighted" else "none")
    rng = np.random.default_rng(hcfg.seed)
    share = -(-fcfg.batch_windows // ctx.world)  # windows per process and batch
    trained = params + list(head.net.parameters())
    best = (start_scores.get("select", -1.0), {**start_scores, "finetune_epoch": 0},
            copy.deepcopy(head.state_dict()), None)
    t0 = time.perf_counter()
    for ep in range(1, fcfg.epochs + 1):
        stems = [train[i] for i in rng.permutation(len(train))][: fcfg.max_images or None]
        head.train()
        total, count = 0.0, 0
        for s in stems:
            sample = ds.load(s)
            if not (sample.points.class_ids >= 0).any():
                continue
            fz.set_image(sample.image, sample.mpp)
            groups = fz.group_points(sample.points.xy)
            labels = torch.from_numpy(sample.points.class_ids)
            for i in range(0, len(groups), fcfg.batch_windows):
                chunk = groups[i:i + fcfg.batch_windows]
                if ctx.active:
                    y_all = torch.cat([labels[torch.from_numpy(sel)] for _, sel, _ in chunk])
                    if not (y_all >= 0).any():
                        continue
                    v = _parallel_step(enc, fz, head, chunk[ctx.rank * share:(ctx.rank + 1) * share], labels, y_all,
                                       weight, opt, trained, ctx)
                    y = y_all
                else:
                    maps = enc(fz.prepare(torch.stack([fz.crop(k) for k, _, _ in chunk])))
                    feats = torch.cat([fz.sample(m, local) for m, (_, _, local) in zip(maps, chunk)])
                    y = torch.cat([labels[torch.from_numpy(sel)] for _, sel, _ in chunk])
                    if not (y >= 0).any():
                        continue
                    loss = F.cross_entropy(head(feats.float()), y, weight=weight, ignore_index=-1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    v = float(loss.detach())
                if not math.isfinite(v):
                    raise ModelError(f"{mode} fine-tuning diverged: loss {v} at epoch {ep}/{fcfg.epochs} "
                                     f"(encoder lr {plain_number(fcfg.lr)}); nothing was written. Lower --ft-lr")
                total += v * int((y >= 0).sum())
                count += int((y >= 0).sum())
        if ctx.active:  # the ranks' loss shares add up to the global batch losses
            total = float(all_reduce_sum(torch.tensor([total], dtype=torch.float64), ctx)[0])
            check_replicas(torch.nn.ModuleList([enc.body, head]), ctx, "encoder and head")
        head.eval()
        m = make_val_scorer()(head)
        log(f"  finetune epoch {ep}/{fcfg.epochs} loss {total / max(count, 1):.4f} val {m['select']:.4f} "
            f"{time.perf_counter() - t0:.0f} s")
        if m["select"] > best[0]:
            sd = {k: v.detach().clone() for k, v in enc.body.state_dict().items()}
            best = (m["select"], {**m, "epoch": best[1].get("epoch", 0), "finetune_epoch": ep},
                    copy.deepcopy(head.state_dict()), sd)
    head.load_state_dict(best[2])
    for p in enc.body.parameters():
        p.requires_grad_(False)
    if best[3] is not None:
        enc.body.load_state_dict(best[3])
    enc.body = _merged_body(enc, mode)
    final = enc.body.state_dict()
    if best[3] is None:
        enc.body.load_state_dict(base)
        log("  no fine-tuning epoch beat the frozen encoder on val; keeping the frozen encoder")
        return head.eval(), best[1], {}, ""
    changed = {k: v.detach().clone() for k, v in final.items() if k in base and not torch.equal(v, base[k])}
    enc.freeze()
    return head.eval(), best[1], changed, state_dict_sha256(changed)
