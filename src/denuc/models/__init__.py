"""Shared network builders (backbones with pretrained weights) used by several stages."""
