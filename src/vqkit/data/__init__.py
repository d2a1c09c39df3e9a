"""Data sources with fixed TRAIN/TEST splits; images come out as float32 [C, H, W] in [-1, 1]."""

from .sources import NAMED_SOURCES, ArraySource, ImageSource, SourceError, index_split, load_source

__all__ = ["load_source", "ImageSource", "ArraySource", "SourceError", "NAMED_SOURCES", "index_split"]
