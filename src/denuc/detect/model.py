"""The DeNuC point detector: backbone -> PAN -> point head, one anchor per stride-8 cell.

Frame: pixel-edge frame of the input tensor; the anchor of cell ``(row i, col j)`` is its
centre ``(8 j + 4, 8 i + 4)`` and a proposal is ``anchor + offset`` in pixels (x, y).
Inputs whose sides are not multiples of 32 are zero-padded (in normalised units, i.e. the
mean colour) at the right/bottom internally; proposals are reported in the input frame
and those falling in the padding are dropped at inference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from denuc.detect.backbones import BACKBONES, DEFAULT_NECK_WIDTH
from denuc.detect.matcher import MATCHERS, match_cost
from denuc.detect.neck import PAN, PointHead
from denuc.merge.nms import point_nms

STRIDE = 8
PAD_MULTIPLE = 32


@dataclass
class DetectorConfig:
    """Architecture and inference settings of a :class:`PointDetector` (JSON-serialisable).

    ``nms_radius_px`` and every length here are in pixels of the model's input frame (the
    training mpp); the checkpoint also stores µm values.
    """

    backbone: str = "shufflenetv2_1.0x"
    neck_width: int = 0  # 0 = the backbone's default (see DEFAULT_NECK_WIDTH)
    num_classes: int = 1
    class_names: tuple[str, ...] = ("nucleus",)
    head_activation: str = "leaky_relu"
    matcher: str = "cheapest"
    bg_weight: float = 0.5
    offset_weight: float = 5e-3
    length_scale: float = 1.0  # loss/matching lengths = input px x length_scale (see TrainConfig.loss_ref_mpp)
    score_threshold: float = 0.5
    nms_radius_px: float = 6.0
    mean: tuple[float, float, float] = field(default=(0.485, 0.456, 0.406))
    std: tuple[float, float, float] = field(default=(0.229, 0.224, 0.225))

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if not self.neck_width:
            self.neck_width = DEFAULT_NECK_WIDTH.get(self.backbone, 96)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes but names {self.class_names}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = cls.__dataclass_fields__.keys()
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


def cell_anchors(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Anchors ``(h*w, 2)`` (x, y) px at the centres of an ``h x w`` grid of 8x8 cells, row-major."""
    ys = torch.arange(h, device=device, dtype=torch.float32) * STRIDE + STRIDE / 2
    xs = torch.arange(w, device=device, dtype=torch.float32) * STRIDE + STRIDE / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


class PointDetector(nn.Module):
    """Point detector with the torchvision detection contract.

    ``forward(images (B, 3, H, W) normalised float, targets)``:

    * train mode: ``targets`` = list of ``{"points": (Ni, 2) float (x, y) px, "labels": (Ni,)
      int in [0, num_classes), or -1 for a nucleus of unknown class}``; returns
      ``{"loss_cls", "loss_offset", "loss"}``.
    * eval mode: list of ``{"points": (N, 2), "scores": (N,), "labels": (N,)}`` per image
      after ``score > score_threshold`` and point NMS (radius ``nms_radius_px``).
    """

    def __init__(self, config: DetectorConfig, pretrained: bool = False, pretrained_path: str | None = None) -> None:
        super().__init__()
        self.config = config
        build = BACKBONES.get(config.backbone)
        kw: dict[str, Any] = {"pretrained_path": pretrained_path}
        if config.backbone == "efficientnet-lite0":
            kw["pretrained"] = pretrained
        self.backbone = build(**kw)
        self.neck = PAN(tuple(self.backbone.out_channels), config.neck_width)
        self.head = PointHead(config.neck_width, config.num_classes, config.head_activation)
        self.matcher = MATCHERS.get(config.matcher)
        self.register_buffer("cls_weight", torch.tensor([config.bg_weight] + [1.0] * config.num_classes),
                             persistent=False)

    # ---------------------------------------------------------------- core
    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All proposals: ``logits (B, h*w, C+1)`` and ``points (B, h*w, 2)`` px (input frame)."""
        _, _, h, w = images.shape
        ph, pw = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
        logits, offsets = self.head(self.neck(self.backbone(images)))
        b, c, gh, gw = logits.shape
        anchors = cell_anchors(gh, gw, images.device)
        points = anchors[None] + offsets.permute(0, 2, 3, 1).reshape(b, gh * gw, 2).float()
        return logits.permute(0, 2, 3, 1).reshape(b, gh * gw, c).float(), points

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None, *,
                sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        logits, points = self.raw(images)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self.loss(logits, points, targets, sum_across=sum_across)
        return self.postprocess(logits, points, images.shape[-2:])

    # ---------------------------------------------------------------- loss
    def loss(self, logits: torch.Tensor, points: torch.Tensor, targets: list[dict[str, torch.Tensor]], *,
             sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """CE over all proposals (background weight ``bg_weight``) + ``offset_weight`` x the
        squared error of matched proposals (summed over x, y, averaged over matches; 0 when
        the batch has no ground truth). Lengths in the matching cost and the offset error
        are input pixels times ``length_scale``.

        A point labelled -1 (a nucleus of unknown class) is matched by its probability of
        being any nucleus, ``1 - p(background)``; its proposal's classification term is
        ``-log(1 - p(background))`` (weight 1, like a class), so it is trained as a nucleus
        without a class target, and its offset is trained as usual.

        ``sum_across`` (data-parallel training, :mod:`denuc.train.distributed`): this batch is
        one rank's share of a global batch; the normalisers (class-weight sum, match count) are
        passed through ``sum_across`` (summed over the ranks) so that the returned losses are
        this rank's *share* of the global batch's losses (the shares of all ranks add up to the
        loss one process would compute on the whole batch)."""
        if sum_across is not None:
            return self._loss_share(logits, points, targets, sum_across)
        b, p, _ = logits.shape
        target_cls, sq, n_match = self._match(logits, points, targets)
        flat = logits.reshape(b * p, -1)
        unknown = target_cls < 0
        cls_weight: torch.Tensor = self.cls_weight  # type: ignore[assignment]
        if not bool(unknown.any()):
            loss_cls = F.cross_entropy(flat, target_cls.reshape(-1), weight=cls_weight)
        else:
            # weighted mean as F.cross_entropy's, with the unknown-class matches as
            # -log(1 - p(bg)) = logsumexp(all logits) - logsumexp(class logits), weight 1
            unk = unknown.reshape(-1)
            tgt = target_cls.reshape(-1)
            ce = F.cross_entropy(flat[~unk], tgt[~unk], weight=cls_weight, reduction="sum")
            nll_fg = torch.logsumexp(flat[unk], -1) - torch.logsumexp(flat[unk][:, 1:], -1)
            loss_cls = (ce + nll_fg.sum()) / (cls_weight[tgt[~unk]].sum() + unk.sum())
        loss_offset = self.config.offset_weight * sq / max(n_match, 1)
        return {"loss_cls": loss_cls, "loss_offset": loss_offset, "loss": loss_cls + loss_offset}

    def _match(self, logits: torch.Tensor, points: torch.Tensor, targets: list[dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Matching of :meth:`loss`: ``(target class per proposal (B, P), -1 = nucleus of unknown
        class, 0 = background; summed squared offset error of the matches; match count)``."""
        b, p, _ = logits.shape
        target_cls = torch.zeros(b, p, dtype=torch.long, device=logits.device)
        sq = logits.new_zeros(())
        n_match = 0
        probs = logits.detach().softmax(-1)
        for i, t in enumerate(targets):
            gt = t["points"].to(points.device, torch.float32).reshape(-1, 2)
            if len(gt) == 0:
                continue
            labels = t["labels"].to(points.device).long().reshape(-1)
            ls = self.config.length_scale
            known = labels >= 0
            gt_probs = torch.where(known[None], probs[i][:, labels.clamp_min(0) + 1], 1.0 - probs[i][:, :1])
            cost = match_cost(points[i].detach() * ls, gt_probs, gt * ls)
            rows, cols = self.matcher(cost)
            rows, cols = rows.to(points.device), cols.to(points.device)
            target_cls[i, rows] = torch.where(known[cols], labels[cols] + 1, -1)  # -1: nucleus, class unknown
            sq = sq + (((points[i, rows] - gt[cols]) * ls) ** 2).sum()
            n_match += len(rows)
        return target_cls, sq, n_match

    def _loss_share(self, logits: torch.Tensor, points: torch.Tensor, targets: list[dict[str, torch.Tensor]],
                    sum_across: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`loss` as numerators over normalisers summed by ``sum_across``."""
        b, p, _ = logits.shape
        target_cls, sq, n_match = self._match(logits, points, targets)
        flat = logits.reshape(b * p, logits.shape[-1])  # also for an empty share (b = 0)
        tgt = target_cls.reshape(-1)
        unk = tgt < 0
        cls_weight: torch.Tensor = self.cls_weight  # type: ignore[assignment]
        ce = F.cross_entropy(flat[~unk], tgt[~unk], weight=cls_weight, reduction="sum")
        nll_fg = torch.logsumexp(flat[unk], -1) - torch.logsumexp(flat[unk][:, 1:], -1)
        den = torch.stack([cls_weight[tgt[~unk]].sum() + unk.sum(), logits.new_tensor(float(n_match))]).float()
        den = sum_across(den)
        loss_cls = (ce + nll_fg.sum()) / den[0]
        # a share without matches still connects the offset branch (zero gradient): DDP needs a
        # gradient for every parameter on every rank
        sq = sq + 0.0 * points.sum()
        loss_offset = self.config.offset_weight * sq / den[1].clamp_min(1.0)
        return {"loss_cls": loss_cls, "loss_offset": loss_offset, "loss": loss_cls + loss_offset}

    # ---------------------------------------------------------- inference
    @torch.no_grad()
    def candidates(self, images: torch.Tensor, threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image the proposals with ``score > threshold`` inside the image, before NMS:
        ``points (N, 2)``, ``scores (N,)`` = 1 - p(background), ``labels (N,)``, ``probs (N, C)``."""
        logits, points = self.raw(images)
        return self._select(logits, points, images.shape[-2:], threshold)

    def _proposals(self, logits: torch.Tensor, points: torch.Tensor, hw: torch.Size | tuple[int, int],
                   threshold: float | None) -> dict[str, torch.Tensor]:
        """Per anchor of the batch: ``keep (B, A)`` (score > threshold and inside the image),
        ``points (B, A, 2)``, ``scores (B, A)``, ``labels (B, A)``, ``probs (B, A, C)``
        (class probabilities renormalised without the background)."""
        thr = self.config.score_threshold if threshold is None else threshold
        h, w = int(hw[0]), int(hw[1])
        prob = logits.float().softmax(-1)
        scores = 1.0 - prob[..., 0]
        pts = points.float()
        keep = (scores > thr) & (pts[..., 0] >= 0) & (pts[..., 0] < w) & (pts[..., 1] >= 0) & (pts[..., 1] < h)
        cls_prob = prob[..., 1:]
        cls_prob = cls_prob / cls_prob.sum(-1, keepdim=True).clamp_min(1e-12)
        return {"keep": keep, "points": pts, "scores": scores, "labels": cls_prob.argmax(-1), "probs": cls_prob}

    def _select(self, logits: torch.Tensor, points: torch.Tensor, hw: torch.Size | tuple[int, int],
                threshold: float | None) -> list[dict[str, torch.Tensor]]:
        p = self._proposals(logits, points, hw, threshold)
        return [{k: p[k][i][p["keep"][i]] for k in ("points", "scores", "labels", "probs")}
                for i in range(len(logits))]

    @torch.no_grad()
    def candidates_numpy(self, images: torch.Tensor, threshold: float | None = None,
                         raw: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
                         ) -> list[dict[str, np.ndarray]]:
        """:meth:`candidates` as numpy arrays, with one device-to-host copy per output for the
        whole batch (selection per image happens on the host): on a GPU this avoids a
        synchronisation for every image of the batch. ``raw``: what computes :meth:`raw`
        (default: this module; a :mod:`denuc.runtime` runner of it)."""
        logits, points = (raw or self.raw)(images)
        p = {k: v.cpu().numpy() for k, v in self._proposals(logits, points, images.shape[-2:], threshold).items()}
        return [{k: p[k][i][p["keep"][i]] for k in ("points", "scores", "labels", "probs")}
                for i in range(len(p["keep"]))]

    @torch.no_grad()
    def postprocess(self, logits: torch.Tensor, points: torch.Tensor, hw: torch.Size | tuple[int, int],
                    threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        out = []
        for d in self._select(logits, points, hw, threshold):
            keep = point_nms(d["points"].cpu().numpy(), d["scores"].cpu().numpy(), self.config.nms_radius_px)
            idx = torch.as_tensor(keep, dtype=torch.long, device=d["points"].device)
            out.append({k: v[idx] for k, v in d.items() if k != "probs"})
        return out


@functools.lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``(3, 256)`` float32: the normalised value of every uint8 level per channel, computed with
    the same float32 operations as :func:`normalise`'s tensor path (so lookups equal it exactly)."""
    v = torch.arange(256, dtype=torch.uint8).float().div_(255.0)
    m = torch.tensor(mean).view(3, 1)
    s = torch.tensor(std).view(3, 1)
    return ((v[None] - m) / s).numpy()


def normalise(images: np.ndarray | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` or ``(H, W, 3)`` RGB -> float ``(B, 3, H, W)`` normalised tensor."""
    if (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4)
            and images.shape[-1] == 3 and (device is None or torch.device(device).type == "cpu")):
        # CPU: one table lookup per channel straight into a contiguous (B, 3, H, W) array
        x = images if images.ndim == 4 else images[None]
        table = _normalise_table(tuple(float(v) for v in mean), tuple(float(v) for v in std))
        out = np.empty((x.shape[0], 3, x.shape[1], x.shape[2]), np.float32)
        for c in range(3):
            np.take(table[c], x[..., c], out=out[:, c])
        return torch.from_numpy(out)
    t = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.ndim == 3:
        t = t[None]
    t = t.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=t.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=t.device).view(1, 3, 1, 1)
    return (t - m) / s


def build_detector(config: DetectorConfig, pretrained: bool = False) -> PointDetector:
    """A :class:`PointDetector` with ``config.mean/std`` set from the backbone."""
    model = PointDetector(config, pretrained=pretrained)
    config.mean = tuple(model.backbone.mean)  # type: ignore[assignment]
    config.std = tuple(model.backbone.std)  # type: ignore[assignment]
    return model
