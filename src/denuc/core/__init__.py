"""Core types shared by every stage."""

from denuc.core.mpp import check_mpp
from denuc.core.result import NO_CLASS, Nuclei

__all__ = ["NO_CLASS", "Nuclei", "check_mpp"]
