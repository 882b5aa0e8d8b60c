"""Resolution metadata of TIFF files (resolution tags, OME-XML).

Every function returns ``(mpp_x, mpp_y, source)`` in µm per pixel with a human-readable
source, or ``None`` with a reason, and never guesses: a resolution unit of "none" and values
that cannot be a microscope's (e.g. 72 dpi, which many image writers put by default) are not
trusted.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from denuc.core.mpp import MPP_MAX, MPP_MIN

#: µm per resolution unit of the TIFF ``ResolutionUnit`` tag (2 = inch, 3 = centimeter; 4 and 5
#: are tifffile's millimeter and micrometer extensions). 1 = no unit: not trusted.
_RESUNIT_UM = {2: ("inch", 25400.0), 3: ("centimeter", 10000.0), 4: ("millimeter", 1000.0), 5: ("micrometer", 1.0)}

#: µm per OME length unit symbol (``PhysicalSizeXUnit``); OME's default unit is µm.
_OME_UNIT_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
                "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6,
                "Å": 1e-4, "pm": 1e-6}

Found = tuple[float, float, str]

def plausible(mpp: float) -> bool:
    """``MPP_MIN <= mpp <= MPP_MAX`` (and finite)."""
    return math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX


def _rational(v: Any) -> float:
    if isinstance(v, tuple) and len(v) == 2:
        return float(v[0]) / float(v[1]) if float(v[1]) else float("nan")
    return float(v)


def tiff_resolution_mpp(page: Any) -> tuple[Found | None, str]:
    """µm per pixel from a tifffile page's ``XResolution``/``YResolution``/``ResolutionUnit``.

    Returns ``((mpp_x, mpp_y, "TIFF XResolution/YResolution (<unit>)"), "")`` or
    ``(None, why)``: tags absent, unit "none", zero resolution, or a value outside the
    plausible µm-per-pixel range (for example the 72 dpi many writers store by default).
    """
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, ""
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # the TIFF default is inch
    try:
        rx, ry = _rational(tags["XResolution"].value), _rational(tags["YResolution"].value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None, "TIFF resolution tags are unreadable"
    if unit not in _RESUNIT_UM:
        return None, "TIFF resolution tags have no unit"
    uname, um = _RESUNIT_UM[unit]
    if not (rx > 0 and ry > 0 and math.isfinite(rx) and math.isfinite(ry)):
        return None, "TIFF resolution tags are zero"
    mx, my = um / rx, um / ry
    if not (plausible(mx) and plausible(my)):
        return None, (f"TIFF resolution {rx:g} x {ry:g} px per {uname} = {mx:.4g} µm/px is not a "
                      "microscope resolution (a default of the writing program)")
    return (mx, my, f"TIFF XResolution/YResolution ({uname})"), ""


def ome_mpp(xml: str) -> tuple[Found | None, str]:
    """µm per pixel from OME-XML: ``PhysicalSizeX``/``PhysicalSizeY`` of the first ``Pixels``
    element, in ``PhysicalSizeXUnit``/``PhysicalSizeYUnit`` (default µm)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        return None, f"OME-XML does not parse ({e})"
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, "OME-XML has no Pixels element"
    vals = []
    for ax in ("X", "Y"):
        v = pixels.get(f"PhysicalSize{ax}")
        if v is None:
            return None, ""
        unit = pixels.get(f"PhysicalSize{ax}Unit", "µm").strip()
        if unit not in _OME_UNIT_UM:
            return None, f"OME PhysicalSize{ax}Unit {unit!r} is not a length unit DeNuC knows"
        try:
            vals.append(float(v) * _OME_UNIT_UM[unit])
        except ValueError:
            return None, f"OME PhysicalSize{ax} {v!r} is not a number"
    return (vals[0], vals[1], "OME PhysicalSizeX/Y"), ""


def tiff_file_mpp(tf: Any) -> tuple[Found | None, str]:
    """µm per pixel of an open ``tifffile.TiffFile``: OME-XML first (when the file is
    OME-TIFF), then the first page's resolution tags."""
    why = ""
    if getattr(tf, "is_ome", False) and tf.ome_metadata:
        found, why = ome_mpp(tf.ome_metadata)
        if found is not None:
            return found, ""
    found, why2 = tiff_resolution_mpp(tf.pages.first)
    return found, "; ".join(w for w in (why, why2) if w)


def truncation(tf: Any, size: int) -> str:
    """Why the image data of a TIFF's series reach past the end of the file, or ``""``."""
    for series in tf.series:
        for level in series.levels:
            for page in level.pages:
                if page is None or not hasattr(page, "dataoffsets"):
                    continue
                offs = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if len(offs) and int((offs + counts).max()) > size:
                    return (f"the file is truncated: it has {size} bytes but its image data reach byte "
                            f"{int((offs + counts).max())}")
    return ""
