"""Tiles of a pixel source: exact region resampling (:mod:`.resample`) and the tile plan (:mod:`.plan`)."""
