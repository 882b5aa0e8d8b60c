"""Exceptions raised by DeNuC. Every user-facing failure is a :class:`DenucError`."""

from __future__ import annotations


class DenucError(Exception):
    """Base class for every error DeNuC raises on purpose (bad input, bad config)."""


class InputError(DenucError, ValueError):
    """An input file or array is missing, unreadable or malformed. The message names the file."""


class ResolutionError(DenucError, ValueError):
    """The µm-per-pixel (mpp) of an image is missing, absurd or inconsistent with a model."""


class MissingMppError(ResolutionError):
    """An input carries no µm per pixel at all (not an implausible or anisotropic one): the
    case ``--mpp-default`` (Python ``mpp_default=``) fills in."""


class ModelError(DenucError, RuntimeError):
    """A model, checkpoint or weight file cannot be built or loaded, or does not fit its use."""
