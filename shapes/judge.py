"""The shapes world's judges: what an image shows and what a sentence claims, without a model.
benchmark.py scores a DreamLLM with them; weights/train_toy.py chose the toy backbones with them.

  analyse(image)        -> (colour, shape) of the largest shape, or (None, None)
  analyse_scene(image)  -> [Found]: every shape, its colour, shape, size, position and jitter
  parse_caption(text)   -> [{"color", "shape", "size", "position"} (any subset)], one per phrase

They are exact on clean drawings (tests/test_benchmark.py) and read a small diffusion model's blur
and noise: a 3x3 median filter first, colours read from a blob's core, outlines redrawn at half a
shape's distance from the background.
"""
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from shapes.data import BACKGROUND, COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Shape

FOREGROUND = 100  # RGB distance from BACKGROUND above which a pixel belongs to a shape
MIN_PIXELS = 12   # a smaller blob is noise, not a shape


def _components(mask):
    """Labels of the 4-connected components of a boolean (H, W) mask, (H, W) ints, mask.size off the
    mask: every pixel takes the smallest label among itself and its neighbours until nothing changes
    (at most ~H*W/2 rounds, ~30 in practice)."""
    big = mask.size
    lab = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new = np.where(mask, new, big)
        if (new == lab).all():
            return lab
        lab = new


def _largest_blob(mask):
    """The largest 4-connected component of a boolean (H, W) mask."""
    if not mask.any():
        return mask
    lab = _components(mask)
    labels, counts = np.unique(lab[mask], return_counts=True)
    return lab == labels[counts.argmax()]


def classify(mask):
    """circle, square or triangle from a blob's geometry, inside its bounding box: a triangle (apex
    up) is much narrower in its top quarter than in its bottom quarter; a square fills the box's
    corners, a circle leaves them empty (fill ratios 1, pi/4 and 1/2 blur too much to rely on)."""
    rows, cols = np.nonzero(mask)
    blob = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # (h, w)
    h, w = blob.shape
    widths = blob.sum(1)
    q = max(1, h // 4)
    top, bottom = widths[:q].mean(), widths[-q:].mean()
    if top < 0.6 * bottom:
        return "triangle"
    a, b = max(1, round(0.2 * h)), max(1, round(0.2 * w))  # corner patches, a fifth of each side
    corners = np.mean([blob[:a, :b].mean(), blob[:a, -b:].mean(), blob[-a:, :b].mean(), blob[-a:, -b:].mean()])
    return "square" if corners > 0.35 else "circle"  # clean: 0.9 vs 0.1; blur rounds corners


def _pixels(image):
    # -> x (64, 64, 3) float32 after a 3x3 median filter (the blur and noise of a small diffusion
    # model), dist (64, 64): each pixel's RGB distance from the background
    img = image.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)  # antialiased both ways
    x = np.asarray(img.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    return x, np.linalg.norm(x - np.array(BACKGROUND, np.float32), axis=-1)


def _colour(x, dist, blob):
    # -> (palette name, its RGB distance from the background) of a blob. Blur mixes the rim with
    # the background, so the colour is read from the blob's core: the half of its pixels farthest
    # from the background.
    core = blob & (dist >= np.median(dist[blob]))
    rgb = np.median(x[core], axis=0)
    color = min(COLORS, key=lambda c: float(((rgb - np.array(COLORS[c])) ** 2).sum()))
    return color, float(np.linalg.norm(rgb - np.array(BACKGROUND)))


def analyse(image):
    """(colour, shape) of the largest shape in an image of the shapes world, or (None, None) if it
    shows none. Robust to the blur and noise of a small diffusion model: a 3x3 median filter first,
    then the largest foreground blob, its median colour's nearest palette entry, and its geometry."""
    x, dist = _pixels(image)
    mask = _largest_blob(dist > FOREGROUND)
    if mask.sum() < MIN_PIXELS:
        return None, None
    color, far = _colour(x, dist, mask)
    # Redraw the outline at half the shape's own distance from the background: a blurred edge
    # crosses that level where the sharp edge was, whatever the colour.
    return color, classify(_largest_blob(dist > 0.5 * far))


@dataclass(frozen=True)
class Found(Shape):
    pixels: int = 0  # the blob's area at the FOREGROUND level, pixels of the 64 grid


def analyse_scene(image):
    """Every shape in an image of the shapes world: [Found], left to right, then top to bottom
    (the order of POSITIONS' centres). Each foreground blob of MIN_PIXELS or more is read as analyse
    reads the largest: its colour, its outline at half that colour's distance, its shape; then its
    size (the SIZES half-extent nearest half its bounding box's longer side) and position (the
    POSITIONS centre nearest its bounding box's centre, not its centroid: a triangle's sits r/3
    lower), and the jitter dx, dy left over. Exact on clean drawings, jitter included
    (tests/test_benchmark.py)."""
    x, dist = _pixels(image)
    fg = dist > FOREGROUND
    lab = _components(fg)
    labels, counts = np.unique(lab[fg], return_counts=True)
    blobs = [lab == i for i, n in zip(labels, counts) if n >= MIN_PIXELS]
    found = []
    for blob in blobs:
        color, far = _colour(x, dist, blob)
        # the outline: the component of the half level that holds most of this blob, unless two
        # shapes blurred into one there (then the blob itself)
        level = dist > 0.5 * far
        low = _components(level)
        inside = low[blob & level]
        outline = blob
        if inside.size:
            outline = low == np.bincount(inside).argmax()
            if sum((outline & b).any() for b in blobs) > 1:
                outline = blob
        rows, cols = np.nonzero(outline)
        h, w = rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()
        cx, cy = (cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2  # pixel edges
        size = min(SIZES, key=lambda k: abs(SIZES[k] - max(h, w) / 2))
        shape = classify(outline)
        if shape == "triangle":  # its apex and base corners thin out below the level: the centre
            cy = rows.max() + 1 - SIZES[size]  # is the half-extent above the base
        where = min(POSITIONS, key=lambda k: math.dist(POSITIONS[k], (cx, cy)))
        px, py = POSITIONS[where]
        found.append(Found(color, shape, size, where, round(cx - px), round(cy - py),
                           int(blob.sum())))
    return sorted(found, key=lambda f: (POSITIONS[f.position], f.dx, f.dy))


# The text side: what a sentence of the shapes world claims. A phrase ends at ".", ",", "and" or
# an article ("a", "the"), and where it names an attribute it already named ("a red blue circle":
# two claims, "red" and "blue circle"), so each phrase claims one shape.
_WORDS = {**{c: ("color", c) for c in COLORS}, **{s: ("shape", s) for s in SHAPES},
          **{s: ("size", s) for s in SIZES},
          **{p.replace(" ", "_"): ("position", p) for p in POSITIONS}}
_BREAKS = {"a", "an", "the", "and", ".", ",", ";", "!", "?"}


def parse_caption(text):
    """What shapes-world text claims, one dict per phrase that names something, in order:
    "The red square is small. a blue circle on the left" -> [{"color": "red", "shape": "square",
    "size": "small"}, {"color": "blue", "shape": "circle", "position": "on the left"}]; the keys are
    Shape's fields, any subset."""
    text = text.lower()
    for p in POSITIONS:  # "on the left" -> one word, "on_the_left"
        text = re.sub(r"\b" + p.replace(" ", r"\s+") + r"\b", p.replace(" ", "_"), text)
    claims, claim = [], {}
    for word in re.findall(r"[a-z_]+|[.,;!?]", text):
        field, value = _WORDS.get(word, (None, None))
        if word in _BREAKS or field in claim:
            claims, claim = claims + [claim] if claim else claims, {}
        if field:
            claim[field] = value
    return claims + [claim] if claim else claims
