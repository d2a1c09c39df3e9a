"""``shapes``: procedural images of coloured shapes with captions, and tools to check an image against a caption.

Each image is black with one or more objects (a circle, square or triangle in one of six colours), each in its own
cell of a 3x3 grid of regions, captioned e.g. "a red circle at the top left and a blue square at the bottom". The
captions are exact, so a text-conditioned prior can be scored by measuring what it drew: ``measure_shapes`` finds the
objects of an image (connected components of bright pixels) and reads their colour, region and shape back;
``caption_match`` compares them with a caption or attribute list.

Also here: ``read_captions``, the reader of ``captions.jsonl`` / ``captions.csv`` files that caption image folders.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .sources import NAMED_SOURCES, SPLITS, ArraySource, SourceError

SHAPES = ("circle", "square", "triangle")
# The corners of the RGB cube other than black and white: pairwise at least 255 apart, and told apart by hue alone.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
# Row-major 3x3 grid of regions, named by their row and column; the middle one is "center".
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# TRAIN and TEST scenes come from different seeds.
SPLIT_SEEDS = {"train": 0, "test": 1}
# An object's bounding size is drawn from this share of the image side (a cell is 1/3 of it).
SIZE_RANGE = (0.25, 0.31)
# How far (share of a cell) the centre of an object's box may move from the centre of its cell.
JITTER = 0.2
# Antialiased rendering draws at this many times the size, then averages down.
SUPERSAMPLE = 4
# Pixels brighter than this (max over channels, in [0, 1]) belong to objects.
BRIGHT = 0.5
# Shapes are told apart by moments of their brightness, which blur (as in decoded images) barely moves:
# - the vertical skewness of an apex-up triangle is -0.57 (its mass grows towards the base), 0 for circles/squares;
# - E[x^2 y^2] / (E[x^2] E[y^2]) (x, y from the centre of mass) is 1 for an axis-aligned square (x, y independent)
#   and 2/3 for a disc. Measured at 32 px, sharp to blurred with sigma 1 px: triangles' skewness <= -0.3, the others'
#   within +-0.06; squares' ratio >= 0.91, discs' <= 0.77.
TRIANGLE_MAX_SKEW = -0.2
SQUARE_MIN_RATIO = 0.84
# Brightness counted by the moments: above this floor (which drops background noise), within 1 px of the component.
MOMENT_FLOOR = 0.15


# ------------------------------------------------------------------------------------------------------- scenes
def region_of(x: float, y: float, width: int, height: int) -> str:
    """The region holding the point (x, y) (pixel units, origin at the image's top-left corner)."""
    col = min(2, max(0, int(3 * x / width)))
    row = min(2, max(0, int(3 * y / height)))
    return REGIONS[3 * row + col]


def object_box(obj: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of an object; a triangle's centre (its centroid) lies 2/3 of the way down."""
    (x, y), s = obj["centre"], obj["size"]
    if obj["shape"] == "triangle":
        return x - s / 2, y - 2 * s / 3, x + s / 2, y + s / 3
    return x - s / 2, y - s / 2, x + s / 2, y + s / 2


def _boxes_apart(a: dict, b: dict, gap: float) -> bool:
    (l1, t1, r1, b1), (l2, t2, r2, b2) = object_box(a), object_box(b)
    return l2 - r1 >= gap or l1 - r2 >= gap or t2 - b1 >= gap or t1 - b2 >= gap


def _place(shape: str, colour: str, region: int, size: float, offset: tuple[float, float], image_size: int) -> dict:
    """An object whose box is centred ``offset`` pixels from the centre of its cell, kept one pixel inside the
    image (a shift too small to leave the cell)."""
    cell = image_size / 3
    x, y = (region % 3 + 0.5) * cell + offset[0], (region // 3 + 0.5) * cell + offset[1]
    x += max(0.0, 1 + size / 2 - x) - max(0.0, x + size / 2 - image_size + 1)
    y += max(0.0, 1 + size / 2 - y) - max(0.0, y + size / 2 - image_size + 1)
    centroid_y = y + size / 6 if shape == "triangle" else y  # a triangle's centroid is 1/3 up from its base
    return {"shape": shape, "colour": colour, "region": REGIONS[region], "centre": [x, centroid_y], "size": size}


def random_scene(rng: np.random.Generator, image_size: int = 32, max_objects: int = 2) -> list[dict]:
    """1..max_objects objects in distinct regions, their boxes at least image_size/16 apart (so that they never
    touch). Each is {"shape", "colour", "region", "centre": [x, y] (its centroid), "size" (box side, pixels)}."""
    count = int(rng.integers(1, max_objects + 1))
    kinds = [(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))], int(region))
             for region in rng.choice(len(REGIONS), size=count, replace=False)]
    gap, cell = image_size / 16, image_size / 3
    for _ in range(50):
        objects = [_place(shape, colour, region, rng.uniform(*SIZE_RANGE) * image_size,
                          tuple(rng.uniform(-JITTER, JITTER, size=2) * cell), image_size)
                   for shape, colour, region in kinds]
        if all(_boxes_apart(a, b, gap) for a, b in itertools.combinations(objects, 2)):
            return objects
    # Rarely reached: boxes of the smallest size centred in their cells are image_size/12 apart.
    return [_place(shape, colour, region, SIZE_RANGE[0] * image_size, (0.0, 0.0), image_size)
            for shape, colour, region in kinds]


def caption_of(objects: list[dict]) -> str:
    return " and ".join(f"a {o['colour']} {o['shape']} at the {o['region']}" for o in objects)


_OBJECT_PHRASE = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(REGIONS)})")


def parse_caption(caption: str) -> list[dict]:
    """The objects ({"shape", "colour", "region"}) of a caption in the form ``caption_of`` writes."""
    phrases = caption.strip().split(" and ")
    matches = [_OBJECT_PHRASE.fullmatch(p) for p in phrases]
    if not all(matches):
        raise ValueError(f"not a shapes caption: {caption!r} (expected e.g. 'a red circle at the top left')")
    return [{"colour": m[1], "shape": m[2], "region": m[3]} for m in matches]


def render_scene(objects: list[dict], image_size: int = 32, antialias: bool = True) -> np.ndarray:
    """uint8 [image_size, image_size, 3] image of the objects on black."""
    scale = SUPERSAMPLE if antialias else 1
    canvas = Image.new("RGB", (image_size * scale, image_size * scale))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        colour = COLOURS[obj["colour"]]
        left, top, right, bottom = (v * scale for v in object_box(obj))
        # PIL includes the right/bottom pixel of a box: stop one before, so that the area matches the box.
        if obj["shape"] == "circle":
            draw.ellipse([left, top, right - 1, bottom - 1], fill=colour)
        elif obj["shape"] == "square":
            draw.rectangle([left, top, right - 1, bottom - 1], fill=colour)
        else:
            draw.polygon([((left + right) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=colour)
    if antialias:
        canvas = canvas.resize((image_size, image_size), Image.BOX)
    return np.array(canvas)  # a writable copy


# ------------------------------------------------------------------------------------------------------- source
class ShapesSource(ArraySource):
    """Procedural coloured shapes on black (RGB, unlabelled), captioned.

    ``num_train`` / ``num_test`` scenes of 1..``max_objects`` objects (see ``random_scene``), drawn in sequence from
    a generator seeded per split (TRAIN 0, TEST 1), so a smaller set is the start of a larger one. Rendered at
    ``image_size`` (default 32; ``measure_shapes`` reads them back reliably from 24 px), ``antialias`` by
    supersampling. Labels are -1; ``captions[i]`` is the caption of item i and ``attributes[i]`` its objects.
    """

    def __init__(self, split: str = "train", image_size: int = 32, num_train: int = 8000, num_test: int = 1000,
                 max_objects: int = 2, antialias: bool = True):
        if split not in SPLITS:
            raise SourceError(f"unknown split {split!r}; use one of {SPLITS}")
        if image_size < 16 or min(num_train, num_test) < 1 or not 1 <= max_objects <= len(REGIONS):
            raise SourceError(f"shapes: need image_size >= 16, num_train and num_test >= 1, 1 <= max_objects <= 9; "
                              f"got {image_size}, {num_train}, {num_test}, {max_objects}")
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        count = num_train if split == "train" else num_test
        self.attributes = [random_scene(rng, image_size, max_objects) for _ in range(count)]
        self.captions = [caption_of(objects) for objects in self.attributes]
        images = np.stack([render_scene(objects, image_size, antialias) for objects in self.attributes])
        super().__init__(images, None, "shapes", split)


NAMED_SOURCES["shapes"] = ShapesSource


# -------------------------------------------------------------------------------------------------- measurement
def _as_hwc(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W] in [0, 1], got shape {array.shape}")
    return array.transpose(1, 2, 0).astype(np.float32)


def _nearest_colour(rgb: np.ndarray) -> str:
    # Compare hues, not brightness: a dimmed red is still red.
    hue = rgb / max(float(rgb.max()), 1e-6)
    palette = np.array(list(COLOURS.values()), dtype=np.float32) / 255
    return list(COLOURS)[int(np.argmin(((palette - hue) ** 2).sum(1)))]


def _classify_shape(brightness: np.ndarray, region: np.ndarray) -> str:
    """Shape of the object whose pixels are ``region`` (bool [H, W]) in the brightness map [H, W]."""
    weight = np.clip(brightness - MOMENT_FLOOR, 0, None) * region
    ys, xs = np.indices(brightness.shape)
    total = weight.sum()
    dx = xs - (weight * xs).sum() / total
    dy = ys - (weight * ys).sum() / total
    var_x, var_y = (weight * dx ** 2).sum() / total, (weight * dy ** 2).sum() / total
    skew = (weight * dy ** 3).sum() / total / var_y ** 1.5
    if skew <= TRIANGLE_MAX_SKEW:
        return "triangle"
    ratio = (weight * dx ** 2 * dy ** 2).sum() / total / (var_x * var_y)
    return "square" if ratio >= SQUARE_MIN_RATIO else "circle"


def measure_image(image, min_pixels: int | None = None) -> list[dict]:
    """Objects of one image [3, H, W] in [0, 1]: connected components (4-connected) of bright pixels of at least
    ``min_pixels`` (default H*W/200) pixels, as {"shape", "colour", "region", "centre": [x, y], "pixels"}."""
    hwc = _as_hwc(image)
    height, width = hwc.shape[:2]
    min_pixels = max(1, height * width // 200) if min_pixels is None else min_pixels
    brightness = hwc.max(axis=2)
    labels, count = ndimage.label(brightness > BRIGHT)
    objects = []
    for index in range(1, count + 1):
        component = labels == index
        pixels = int(component.sum())
        if pixels < min_pixels:
            continue
        cy, cx = ndimage.center_of_mass(component)
        x, y = cx + 0.5, cy + 0.5  # pixel i spans [i, i + 1)
        # The blurred rim belongs to the object too, unless it is another object's.
        region = ndimage.binary_dilation(component) & ((labels == 0) | component)
        objects.append({"shape": _classify_shape(brightness, region), "colour": _nearest_colour(hwc[component].mean(0)),
                        "region": region_of(x, y, width, height), "centre": [x, y], "pixels": pixels})
    return objects


def measure_shapes(images, min_pixels: int | None = None) -> list[list[dict]]:
    """``measure_image`` for each of images [N, 3, H, W] in [0, 1] (a tensor or an array)."""
    if len(getattr(images, "shape", ())) != 4:
        raise ValueError(f"expected images [N, 3, H, W], got shape {getattr(images, 'shape', None)}")
    return [measure_image(image, min_pixels) for image in images]


ATTRIBUTES = {"colour": "colour", "position": "region", "shape": "shape"}


def caption_match(image, attributes: list[dict] | str, min_pixels: int | None = None) -> dict[str, bool]:
    """Does image [3, H, W] in [0, 1] show what ``attributes`` (a list of {"shape", "colour", "region"}, or a
    caption) says? Expected and detected objects are paired to agree on as many attributes as possible (ties: the
    closest centres). Returns {"colour", "position", "shape"}: every expected object has a partner with the right
    one; "count": as many objects as expected; "all": all of these."""
    expected = parse_caption(attributes) if isinstance(attributes, str) else list(attributes)
    found = measure_image(image, min_pixels)
    partner = _pair_objects(expected, found)
    result = {name: all(j is not None and found[j][key] == e[key] for e, j in zip(expected, partner))
              for name, key in ATTRIBUTES.items()}
    result["count"] = len(found) == len(expected)
    result["all"] = all(result.values())
    return result


def _pair_objects(expected: list[dict], found: list[dict]) -> list[int | None]:
    """For each expected object, the index of its partner in ``found`` (None when fewer were found): the pairing
    with the most agreeing attributes, then the smallest distance between centres."""
    if not expected or not found:
        return [None] * len(expected)
    agree = np.array([[sum(f[key] == e[key] for key in ATTRIBUTES.values()) for f in found] for e in expected])
    distance = np.array([[np.hypot(*np.subtract(f["centre"], e["centre"])) if "centre" in e else 0.0
                          for f in found] for e in expected])
    # One agreement outweighs any total distance (all well below 1e6 pixels).
    rows, cols = linear_sum_assignment(distance - 1e6 * agree)
    partner = [None] * len(expected)
    for row, col in zip(rows, cols):
        partner[row] = int(col)
    return partner


# ---------------------------------------------------------------------------------------------- caption files
def read_captions(folder) -> dict[str, str]:
    """Captions of an image folder: ``captions.jsonl`` (one {"file": ..., "caption": ...} per line) or
    ``captions.csv`` (rows file,caption; an optional header row "file,caption") in ``folder``.

    Returns {relative path ("/"-separated, as in the file): caption}. Raises SourceError naming the file and line
    of a malformed entry, a duplicate file, or when the folder holds neither file or both.
    """
    folder = Path(folder)
    jsonl, table = folder / "captions.jsonl", folder / "captions.csv"
    if jsonl.is_file() and table.is_file():
        raise SourceError(f"{folder}: holds both captions.jsonl and captions.csv; keep one")
    if jsonl.is_file():
        entries = _jsonl_entries(jsonl)
    elif table.is_file():
        entries = _csv_entries(table)
    else:
        raise SourceError(f"{folder}: no captions.jsonl or captions.csv")
    captions, first_line = {}, {}
    for path, line, file, caption in entries:
        where = f"{path}:{line}"
        if not isinstance(file, str) or not isinstance(caption, str):
            raise SourceError(f"{where}: 'file' and 'caption' must be strings, got {file!r} and {caption!r}")
        relative = PurePosixPath(file.strip().replace("\\", "/"))
        if not file.strip() or relative.is_absolute() or ".." in relative.parts:
            raise SourceError(f"{where}: 'file' must be a path relative to {folder} inside it, got {file!r}")
        key = relative.as_posix()
        if key in captions:
            raise SourceError(f"{where}: a second caption for {key!r} (first on line {first_line[key]})")
        captions[key], first_line[key] = caption, line
    return captions


def _jsonl_entries(path: Path):
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict) or "file" not in entry or "caption" not in entry:
                raise SourceError(f"{path}:{line_number}: expected an object with keys 'file' and 'caption', "
                                  f"got {line.strip()[:80]!r}")
            yield path, line_number, entry["file"], entry["caption"]


def _csv_entries(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        first_row = True
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                is_header = first_row and [cell.strip().lower() for cell in row] == ["file", "caption"]
                first_row = False
                if is_header:
                    continue
                if len(row) != 2:
                    raise SourceError(f"{path}:{reader.line_num}: expected 2 fields (file,caption), got {len(row)}: "
                                      f"{','.join(row)[:80]!r}")
                yield path, reader.line_num, row[0], row[1]
        except csv.Error as e:
            raise SourceError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
