"""Data in: images, point datasets and their readers."""

from denuc.data.base import DATASETS, PointDataset, Sample, open_dataset, register_dataset
from denuc.data.image import read_image, to_rgb_uint8
from denuc.data.readers import brca_m2c, generic, ocelot, puma  # noqa: F401  (registers the built-in readers)

__all__ = ["DATASETS", "PointDataset", "Sample", "open_dataset", "read_image", "register_dataset", "to_rgb_uint8"]
