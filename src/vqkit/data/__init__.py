"""Data sources with fixed TRAIN/TEST splits; images come out as float32 [C, H, W] in [-1, 1]."""

from .sources import NAMED_SOURCES, ArraySource, ImageSource, SourceError, index_split, load_source
from .arrays import load_array_source
from .folder import FolderSource
from .images import make_grid, read_image, resize_image, save_image, to_channels
from .photos import PhotoSource  # importing it registers the named source "photos"
from .shapes import ShapesSource, caption_match, measure_shapes, read_captions  # registers "shapes"

__all__ = ["load_source", "ImageSource", "ArraySource", "SourceError", "NAMED_SOURCES", "index_split",
           "load_array_source", "FolderSource", "PhotoSource", "read_image", "resize_image", "save_image",
           "to_channels", "make_grid", "ShapesSource", "caption_match", "measure_shapes", "read_captions"]
