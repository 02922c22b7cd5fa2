"""A pixel oracle for the Shapes world: colour, shape and fill style read from the pixels, without any CLIP.

A CLIP judge makes a forced choice among the classes it is asked about, so it labels a faint smear or an empty dark
frame as confidently as a clean drawing. The oracle instead checks each image against the way the world draws
(`pipelines.shapes.world`) and says "none" or "unrecognisable" when the picture is not one the world could draw:

1. **Segment.** The background is the median colour of the 1-pixel frame (the world never draws there). The object
   colour ``c`` is the median of the pixels that differ most from it; an image whose object colour differs from the
   background by less than ``min_contrast`` (in 0-255 units), or covers fewer than ``min_pixels``, has no object
   ("none"). Each pixel's coverage ``alpha`` is its projection on the background-to-object line,
   ``alpha = clip(<p - bg, c - bg> / |c - bg|^2, 0, 1)``, which undoes the world's anti-aliasing.
2. **Colour.** The hue, saturation and value of ``c``; the colour is the world colour whose hue range holds it
   (ranges: the nearest world hue, at most ``hue_tolerance`` degrees away; saturation and value above the world's
   lowest). A colour outside every range, or an object whose strong pixels' hues mostly lie over 20 degrees from the
   object's (multicolour noise), has no colour ("unrecognisable").
3. **Shape.** The silhouette is the largest connected blob of ``alpha > 0.2`` (closed with a 2.5-pixel disc when
   stripes or dots have no outline around them) with its holes filled (striped and dotted fills keep a solid
   outline, so their gaps are holes). Each world shape is fitted to it by a coarse-to-fine
   search over centre and size (within 0.8-1.1 times the world's range of sizes, the shape wholly inside the frame),
   starting from the silhouette's centroid and area, on anti-aliased renderings of
   `pipelines.shapes.world.shape_mask`; the score is the soft intersection over union ``sum(min) / sum(max)``. The
   shape with the best IoU wins; below ``min_iou`` (0.75) the shape is "unrecognisable".
4. **Fill style.** Inside the fitted shape, away from its outline, ``alpha`` is compared (least squares) with every
   phase of the world's stripe and dot patterns and with a solid and an empty ("hollow") interior.

`ShapesOracle.read` returns one `OracleReading` per image; `ShapesOracle.classify` gives per-attribute labels that
can stand in for a judge's zero-shot predictions, with "none" (no object) and "unrecognisable" (an object the world
could not have drawn) as extra labels that never equal a world class.
"""

from __future__ import annotations

import colorsys
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from eval.common import EmbeddingsFromClip
from pipelines.shapes.world import (
    FILL_PERIOD,
    OUTLINE,
    RADIUS_RANGE,
    dot_pattern,
    shape_mask,
    stripe_pattern,
)
from prompts.shapes import ATTRIBUTES, ShapesVocab, load_shapes_vocab

NONE = "none"  # no object in the image
UNRECOGNISABLE = "unrecognisable"  # an object, but not one the world draws (for this attribute)
HOLLOW = "hollow"  # a fill style the world never draws: an outline with an empty interior
PURITY_DEGREES = 20.0  # how far a pixel's hue may lie from its object's and still count as the same colour
# area of each shape as a multiple of r^2 (from `shape_mask`), to start the size search from the silhouette's area
_AREA = {"circle": np.pi, "square": 1.64**2, "triangle": 1.8, "cross": 4 * 0.34 * 2 - 0.68**2}
# centroid offset along y as a multiple of r (the triangle's apex is at -r and its base at +0.8 r)
_CENTROID_DY = {"triangle": 0.2}


@dataclass(frozen=True)
class OracleReading:
    """What the oracle read from one image.

    ``colour``/``shape``/``style`` are world classes, or `NONE` (no object) / `UNRECOGNISABLE`; ``style`` may also
    be `HOLLOW`. ``best_shape`` and ``iou`` are the best fit even when it is below the threshold.
    """

    present: bool
    colour: str
    shape: str
    style: str
    hue: float | None = None
    saturation: float | None = None
    value: float | None = None
    colour_purity: float | None = None
    best_shape: str | None = None
    iou: float = 0.0
    centre: tuple[float, float] | None = None
    radius: float | None = None

    @property
    def recognisable(self) -> bool:
        """An object whose colour lies in a world hue range and whose silhouette a world shape fits."""
        return self.present and self.colour not in (NONE, UNRECOGNISABLE) and self.shape not in (NONE, UNRECOGNISABLE)

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)

    def to_dict(self) -> dict:
        return {**asdict(self), "recognisable": self.recognisable}


def _hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*(np.clip(rgb, 0, 255) / 255.0))
    return 360.0 * h, s, v


def _hue_distance(a: np.ndarray | float, b: float) -> np.ndarray:
    d = np.abs(np.asarray(a, dtype=np.float64) - b) % 360.0
    return np.minimum(d, 360.0 - d)


class ShapesOracle:
    """Reads colour, shape and fill style of Shapes world images from their pixels.

    Args:
        vocab (`ShapesVocab`, *optional*): the world's vocabulary (colours and their RGB values); shipped by default.
        min_iou (`float`, *optional*, defaults to 0.75): the least IoU at which a fitted shape counts as recognised.
        hue_tolerance (`float`, *optional*, defaults to 30): how far (degrees) a hue may lie from its world colour's;
            ranges never overlap (a hue belongs to its nearest world colour). The world draws within about 27.
        min_saturation (`float`, *optional*, defaults to 0.35): the least HSV saturation of a world colour (the
            world's lowest is about 0.42, purple).
        min_value (`float`, *optional*, defaults to 0.35): the least HSV value (the world's lowest is about 0.45).
        min_contrast (`float`, *optional*, defaults to 40): the least distance (0-255 RGB) between object and
            background colour for an object to be present (the world's smallest is about 90; pixel noise is 3).
        min_purity (`float`, *optional*, defaults to 0.7): the least share of the object's strong pixels whose own
            hue lies within 20 degrees of the object's (multicolour noise has no colour).
        min_pixels (`int`, *optional*, defaults to 6): the least object size in pixels at 32 px (scaled with the
            area); the world's smallest objects cover about 100.
    """

    world = "shapes"  # whose images it reads

    def __init__(
        self,
        vocab: ShapesVocab | None = None,
        min_iou: float = 0.75,
        hue_tolerance: float = 30.0,
        min_saturation: float = 0.35,
        min_value: float = 0.35,
        min_contrast: float = 40.0,
        min_purity: float = 0.7,
        min_pixels: int = 6,
    ):
        self.vocab = vocab or load_shapes_vocab()
        self.min_iou, self.hue_tolerance = min_iou, hue_tolerance
        self.min_saturation, self.min_value = min_saturation, min_value
        self.min_contrast, self.min_purity, self.min_pixels = min_contrast, min_purity, min_pixels
        self.colours = self.vocab.colours
        self.hues = np.array([_hsv(np.array(self.vocab.rgb(c), dtype=np.float64))[0] for c in self.colours])
        self._templates: dict[int, dict] = {}

    def describe(self) -> dict:
        """A JSON-able record of the oracle and its thresholds (stored next to its judgments)."""
        return {
            "backend": "oracle",
            "name": "shapes-oracle",
            "min_iou": self.min_iou,
            "hue_tolerance": self.hue_tolerance,
            "min_saturation": self.min_saturation,
            "min_value": self.min_value,
            "min_contrast": self.min_contrast,
            "min_purity": self.min_purity,
            "min_pixels": self.min_pixels,
            "hue_ranges": self.hue_ranges(),
        }

    def hue_ranges(self) -> dict[str, list[float]]:
        """Each world colour's hue range ``[low, high]`` in degrees (``low`` may be negative: red wraps around 0)."""
        out = {}
        for i, colour in enumerate(self.colours):
            others = np.delete(self.hues, i)
            below = min(_hue_distance(others, self.hues[i])[((self.hues[i] - others) % 360) < 180], default=360.0)
            above = min(_hue_distance(others, self.hues[i])[((others - self.hues[i]) % 360) < 180], default=360.0)
            low = self.hues[i] - min(self.hue_tolerance, below / 2)
            high = self.hues[i] + min(self.hue_tolerance, above / 2)
            low, high = (low - 360, high - 360) if low > 180 else (low, high)
            out[colour] = [round(float(low), 2), round(float(high), 2)]
        return out

    # ------------------------------------------------------------------------------------------------ colour
    def colour_of(self, hue: np.ndarray | float) -> np.ndarray:
        """Index of the world colour whose hue range holds each hue, or -1."""
        distance = np.stack([_hue_distance(hue, h) for h in self.hues], axis=-1)
        nearest = distance.argmin(axis=-1)
        return np.where(
            np.take_along_axis(distance, nearest[..., None], -1)[..., 0] <= self.hue_tolerance, nearest, -1
        )

    # ------------------------------------------------------------------------------------------------ reading
    def read(self, images: np.ndarray) -> list[OracleReading]:
        """Read every image of a ``uint8 [N, H, W, 3]`` batch (square, at least 32 pixels)."""
        return [self._read_one(image.astype(np.float64)) for image in self._check(images)]

    def classify(self, images: np.ndarray) -> dict[str, list[str]]:
        """Per attribute (``colour``, ``shape``, ``style``), one label per image, as a judge's predictions."""
        readings = self.read(images)
        return {a: [r.get(a) for r in readings] for a in ATTRIBUTES}

    def object_present(self, images: np.ndarray) -> np.ndarray:
        """Whether each image of a ``uint8 [N, H, W, 3]`` batch shows an object at all (segmentation only, no fit):
        the check that keeps a judge from classifying an empty frame."""
        return np.array([self._segment(image.astype(np.float64)) is not None for image in self._check(images)])

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
            raise ValueError(
                f"the oracle reads square uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}: "
                "convert with pipelines.sampling.to_uint8"
            )
        if images.shape[1] < 32:
            raise ValueError(f"the oracle reads Shapes world images of at least 32 pixels, got {images.shape[1]}")
        return images

    def _segment(self, image: np.ndarray):
        """``(colour, strength, alpha, blob)`` of the object in a float ``[H, W, 3]`` image, or None (no object)."""
        scale = image.shape[0] / 32
        frame = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
        background = np.median(frame, axis=0)
        diff = image - background
        strength = np.linalg.norm(diff, axis=-1)
        core = strength >= 0.75 * np.quantile(strength, 0.99)
        colour = np.median(image[core], axis=0)
        direction = colour - background
        contrast = float(np.linalg.norm(direction))
        if contrast < self.min_contrast:
            return None
        alpha = np.clip(diff @ direction / contrast**2, 0.0, 1.0)
        # the outline of a striped or dotted fill is 1.3 px wide and may cover no pixel by more than half; stripes
        # and dots without an outline (as a diffusion model may draw them) are one object once closed (see _silhouette)
        mask = alpha > 0.2
        region = _largest_component(_close(mask, 2.5 * scale))
        blob = mask & region
        if blob.sum() < self.min_pixels * scale**2:
            return None
        return colour, strength / contrast, alpha, blob, region

    def _read_one(self, image: np.ndarray) -> OracleReading:
        scale = image.shape[0] / 32
        segmented = self._segment(image)
        if segmented is None:
            return OracleReading(False, NONE, NONE, NONE)
        colour, strength, alpha, blob, region = segmented
        hue, saturation, value = _hsv(colour)
        index = int(self.colour_of(hue))
        strong = blob & (strength >= 0.5)
        pixel_hues = _hues(image[strong])
        purity = float(np.mean(_hue_distance(pixel_hues, hue) <= PURITY_DEGREES)) if len(pixel_hues) else 0.0
        in_range = index >= 0 and saturation >= self.min_saturation and value >= self.min_value
        colour_name = self.colours[index] if in_range and purity >= self.min_purity else UNRECOGNISABLE

        silhouette = _silhouette(alpha, blob, region)
        best_shape, iou, centre, radius = self._fit_shape(silhouette, scale)
        shape_name = best_shape if iou >= self.min_iou else UNRECOGNISABLE
        style = self._fill_style(alpha, best_shape, centre, radius, scale) if shape_name != UNRECOGNISABLE else None
        return OracleReading(
            True,
            colour_name,
            shape_name,
            style or UNRECOGNISABLE,
            hue=round(hue, 2),
            saturation=round(saturation, 4),
            value=round(value, 4),
            colour_purity=round(purity, 4),
            best_shape=best_shape,
            iou=round(iou, 4),
            centre=(round(centre[0], 3), round(centre[1], 3)),
            radius=round(radius, 3),
        )

    # ------------------------------------------------------------------------------------------------ shape
    def _grid(self, res: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
        key = (res, supersample)
        if key not in self._templates:
            fine = (np.arange(res * supersample) + 0.5) / supersample
            self._templates[key] = np.meshgrid(fine, fine, indexing="ij")
        return self._templates[key]

    def render(self, shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, res: int, supersample: int = 2):
        """Anti-aliased coverage ``[K, res, res]`` of ``shape`` at ``K`` centres and half-sizes (world pixels)."""
        y, x = self._grid(res, supersample)
        cx, cy, r = (np.asarray(v, dtype=np.float64)[:, None, None] for v in (cx, cy, r))
        return _downsample(shape_mask(shape, x[None] - cx, y[None] - cy, r), supersample)

    def _fit_shape(self, silhouette: np.ndarray, scale: float) -> tuple[str, float, tuple[float, float], float]:
        res = silhouette.shape[0]
        area = silhouette.sum()
        ys, xs = np.indices(silhouette.shape) + 0.5
        cx, cy = (xs * silhouette).sum() / area, (ys * silhouette).sum() / area
        # the world draws half-sizes 7-13 px (at 32 px) wholly inside the frame; a fit must stay near that
        r_min, r_max = 0.8 * RADIUS_RANGE[0] * scale, 1.1 * RADIUS_RANGE[1] * scale
        best = (None, -1.0, (cx, cy), 0.0)
        steps = np.array([-1.0, 0.0, 1.0])
        for shape in self.vocab.shapes:
            r = float(np.clip(np.sqrt(area / _AREA[shape]), r_min, r_max))
            x, y = cx, cy - _CENTROID_DY.get(shape, 0.0) * r
            iou = -1.0
            for move, grow in ((0.5 * scale, 0.06), (0.25 * scale, 0.03), (0.125 * scale, 0.015)):
                dx, dy, dr = (g.ravel() for g in np.meshgrid(steps * move, steps * move, steps * grow, indexing="ij"))
                cand_r = np.clip(r * (1 + dr), r_min, r_max)
                coverage = self.render(shape, x + dx, y + dy, cand_r, res)
                ious = np.minimum(coverage, silhouette).sum(axis=(1, 2)) / np.maximum(coverage, silhouette).sum(
                    axis=(1, 2)
                )
                ious = np.where(_inside(shape, x + dx, y + dy, cand_r, res), ious, 0.0)
                k = int(ious.argmax())
                x, y, r, iou = x + dx[k], y + dy[k], float(cand_r[k]), float(ious[k])
            if iou > best[1]:
                best = (shape, iou, (float(x), float(y)), r)
        return best

    # ------------------------------------------------------------------------------------------------ style
    def _fill_style(self, alpha, shape, centre, radius, scale) -> str | None:
        """The world fill pattern (or a solid or empty interior) that best explains the interior's coverage."""
        res = alpha.shape[0]
        inner_r = radius - (OUTLINE + 0.75) * scale
        if inner_r <= 0:
            return None
        inside = self.render(shape, [centre[0]], [centre[1]], [inner_r], res)[0] >= 1.0
        if inside.sum() < 4:
            return None
        values = alpha[inside]
        candidates = self._fill_templates(res, scale)
        errors = {name: np.mean((t[:, inside] - values) ** 2, axis=1).min() for name, t in candidates.items()}
        return min(errors, key=errors.get)

    def _fill_templates(self, res: int, scale: float) -> dict[str, np.ndarray]:
        key = ("fill", res)
        if key not in self._templates:
            supersample = 3
            y, x = self._grid(res, supersample)
            period = FILL_PERIOD * scale
            phases = np.arange(16) / 16 * 2 * period  # stripes repeat every 2 periods along x + y
            stripes = np.stack([stripe_pattern(x + p, y, period) for p in phases])
            grid = np.arange(8) / 8 * period
            dots = np.stack([dot_pattern(x + a, y + b, period) for a in grid for b in grid])
            self._templates[key] = {
                "solid": np.ones((1, res, res)),
                "striped": _downsample(stripes, supersample),
                "dotted": _downsample(dots, supersample),
                HOLLOW: np.zeros((1, res, res)),
            }
        return self._templates[key]


# ---------------------------------------------------------------------------------------------------- helpers
def _inside(shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, res: int) -> np.ndarray:
    """Whether a shape of half-size ``r`` at ``(cx, cy)`` lies wholly inside the frame, as every world shape does."""
    half = 0.82 * r if shape == "square" else r
    top, bottom = (cy - r, cy + 0.8 * r) if shape == "triangle" else (cy - half, cy + half)
    return (cx - half >= 0) & (cx + half <= res) & (top >= 0) & (bottom <= res)


def _downsample(masks: np.ndarray, supersample: int) -> np.ndarray:
    """Coverage ``[K, H, W]`` of boolean masks ``[K, H * s, W * s]``: the mean of each ``s x s`` block (by slicing
    and adding, which is an order of magnitude faster than ``mean`` over reshaped axes of a bool array)."""
    k, fine = masks.shape[0], masks.shape[1]
    blocks = masks.view(np.uint8).reshape(k, fine // supersample, supersample, fine // supersample, supersample)
    total = np.zeros(blocks.shape[:2] + blocks.shape[3:4], dtype=np.float32)
    for i in range(supersample):
        for j in range(supersample):
            total += blocks[:, :, i, :, j]
    return total / supersample**2


def _hues(pixels: np.ndarray) -> np.ndarray:
    """Hue in degrees of ``[N, 3]`` RGB pixels (vectorised ``colorsys.rgb_to_hsv``)."""
    if not len(pixels):
        return np.zeros(0)
    r, g, b = (np.clip(pixels, 0, 255) / 255.0).T
    high, low = pixels.max(axis=1) / 255.0, pixels.min(axis=1) / 255.0
    span = np.where(high - low > 0, high - low, 1.0)
    hue = np.where(high == r, (g - b) / span, np.where(high == g, 2.0 + (b - r) / span, 4.0 + (r - g) / span))
    return (hue * 60.0) % 360.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    best, best_size, current = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        queue, size = deque([start]), 0
        while queue:
            i, j = queue.popleft()
            size += 1
            for a in (i - 1, i, i + 1):
                for b in (j - 1, j, j + 1):
                    if 0 <= a < h and 0 <= b < w and mask[a, b] and not labels[a, b]:
                        labels[a, b] = current
                        queue.append((a, b))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every region it encloses (background 4-connected to the image border stays outside)."""
    outside = np.zeros_like(mask)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~mask[0], ~mask[-1], ~mask[:, 0], ~mask[:, -1]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a disc of ``radius`` pixels (outside the image counts as empty)."""
    h, w = mask.shape
    out = mask.copy()
    reach = int(np.floor(radius))
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dx * dx + dy * dy <= radius * radius and (dx or dy):
                out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] |= mask[
                    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
                ]
    return out


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary closing (dilation, then erosion) by a disc: bridges gaps narrower than ``2 * radius``."""
    return ~_dilate(~_dilate(mask, radius), radius)


def _silhouette(alpha: np.ndarray, blob: np.ndarray, closed: np.ndarray) -> np.ndarray:
    """Soft silhouette: 1 inside the blob's filled outline, the pixel's coverage on its edge, 0 elsewhere.

    A striped or dotted fill without an outline (as a diffusion model may draw it) has no closed outline to fill.
    ``closed`` is the blob closed with a disc of 2.5 pixels (stripes meet an edge 4 pixels apart, dots at most 3.4; a
    disc bridges gaps up to twice its radius); when filling its holes covers over 15% more than filling the blob's
    alone, it is used. (Closing also rounds a cross's inner corners, so it is not used where the outline is whole.)
    """
    filled = _fill_holes(blob)
    closed = _fill_holes(closed) | filled
    if closed.sum() > 1.15 * filled.sum():
        filled = closed
    interior = filled.copy()  # filled pixels whose four neighbours are filled too
    interior[1:] &= filled[:-1]
    interior[:-1] &= filled[1:]
    interior[:, 1:] &= filled[:, :-1]
    interior[:, :-1] &= filled[:, 1:]
    edge = _dilate(filled, 1.0)
    return np.where(interior, 1.0, np.where(edge, alpha, 0.0))


class OracleJudge(EmbeddingsFromClip):
    """The oracle behind the evaluator's judge boundary (``--judge oracle``): attribute labels come from the pixels
    (`classify`); the metrics that need embeddings (preservation, fd_clip, clip_score) use a Shapes CLIP, which
    `describe` names.

    Args:
        clip: the Shapes CLIP scorer (`eval.clip.ShapesClipScorer`) whose image and text embeddings the embedding
            metrics use (`eval.clip.load_judge` ``("oracle")`` passes the judge CLIP).
        oracle (`ShapesOracle`, *optional*): the oracle; default thresholds when left out.
    """

    world = "shapes"  # the world whose images it can read

    def __init__(self, clip, oracle: ShapesOracle | None = None):
        self.oracle = oracle or ShapesOracle()
        self.clip = clip
        self.name = "shapes-oracle"
        self.batch_size, self.embed_dim = self.clip.batch_size, self.clip.embed_dim

    def classify(self, images: np.ndarray, tasks=ATTRIBUTES) -> dict[str, list[str]]:
        """One label per image for each task (``colour``, ``shape``, ``style``), including `NONE`/`UNRECOGNISABLE`."""
        unknown = [t for t in tasks if t not in ATTRIBUTES]
        if unknown:
            raise ValueError(
                f"the Shapes oracle reads {', '.join(ATTRIBUTES)} only, not {', '.join(unknown)}: use a CLIP --judge "
                "for this prompt set"
            )
        labels = self.oracle.classify(images)
        return {t: labels[t] for t in tasks}

    def describe(self) -> dict:
        return {**self.oracle.describe(), "embeddings": self.clip.describe()}


def oracle_for(world: str | None) -> ShapesOracle | None:
    """The pixel oracle of ``world``'s images (`ShapesOracle` for the Shapes world), or ``None`` (no world, or one
    without an oracle)."""
    return ShapesOracle() if world == ShapesOracle.world else None


def object_check(world: str | None):
    """The pixel check ``images -> [bool]`` (is there an object at all) of ``world``'s images, or ``None``."""
    oracle = oracle_for(world)
    return oracle.object_present if oracle else None
