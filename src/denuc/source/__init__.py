"""Reading images, slides and arrays as pyramids of RGB levels with a level-0 µm per pixel,
plus tissue masks and regions of interest in level-0 pixels.

``open_source(path_or_array, mpp=None)`` gives a :class:`SlideSource`;
``detect_tissue(*source.thumbnail(), source.mpp)`` a :class:`TissueMask`;
``load_rois(geojson, source.dimensions)`` a :class:`RegionsOfInterest`.
"""

from denuc.source.array import ArraySource, ImageSource
from denuc.source.base import (
    SLIDE_SUFFIXES,
    BackendDeclined,
    SlideSource,
    is_slide_path,
    thumbnail_geometry,
)
from denuc.source.opening import SOURCE_BACKENDS, open_source
from denuc.source.roi import RegionsOfInterest, load_rois
from denuc.source.slide import OpenSlideSource, TiffSlideSource
from denuc.source.tissue import TISSUE_METHODS, TissueMask, detect_tissue, full_mask, load_tissue_mask, tissue_mask

__all__ = [
    "SLIDE_SUFFIXES",
    "SOURCE_BACKENDS",
    "TISSUE_METHODS",
    "ArraySource",
    "BackendDeclined",
    "ImageSource",
    "OpenSlideSource",
    "RegionsOfInterest",
    "SlideSource",
    "TiffSlideSource",
    "TissueMask",
    "detect_tissue",
    "full_mask",
    "is_slide_path",
    "load_rois",
    "load_tissue_mask",
    "open_source",
    "thumbnail_geometry",
    "tissue_mask",
]
