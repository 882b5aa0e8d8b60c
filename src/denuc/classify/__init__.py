"""Classification heads on point features and their self-describing checkpoints."""

from denuc.classify.head import HEAD_MODES, HeadMeta, PointHead, load_head, read_meta, save_head

__all__ = ["HEAD_MODES", "HeadMeta", "PointHead", "load_head", "read_meta", "save_head"]
