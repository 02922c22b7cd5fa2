"""Procedural images of the Shapes world: one coloured, filled shape per image, with captions.

Each image shows one object on a dark grey background. Its attributes are a colour (six, with red/orange as
the near pair), a shape (circle, square, triangle, cross) and a fill style (solid, striped, dotted: the
"art style" of this world), at a random size and position. Captions come from several templates, use
synonyms for some words ("crimson" for red, "disc" for circle, "with stripes" for striped) and often leave
attributes out, so a generator also learns "a circle" in any colour.

Drawing is vectorised over a batch with numpy and is deterministic for a given `numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prompts.shapes import ShapesVocab, fix_articles, load_shapes_vocab

SUPERSAMPLE = 3  # shapes are rasterised at 3x and averaged down, which anti-aliases their edges
# Drawing constants in pixels at 32 px (scaled with the resolution); the pixel oracle (eval/oracle.py) fits the same
OUTLINE = 1.3  # width of the solid outline that striped and dotted fills keep
FILL_PERIOD = 4.0  # period of the stripe bands (along x + y) and of the dot grid
DOT_RADIUS = 0.28  # dot radius as a fraction of the period
RADIUS_RANGE = (7.0, 13.0)  # half-size of a shape, drawn uniformly


@dataclass(frozen=True)
class Attributes:
    """What one world image shows."""

    colour: str
    shape: str
    style: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


class ShapesWorld:
    """Draws world images and writes their captions.

    Args:
        resolution (`int`, *optional*, defaults to 32): image side in pixels (at least 32).
        vocab (`ShapesVocab`, *optional*): the world's vocabulary; the shipped one by default.
    """

    attributes = ("colour", "shape", "style")

    def __init__(self, resolution: int = 32, vocab: ShapesVocab | None = None):
        if resolution < 32:
            raise ValueError(f"resolution {resolution} is too small: the Shapes world needs at least 32 pixels")
        self.resolution = resolution
        self.vocab = vocab or load_shapes_vocab()

    # ----------------------------------------------------------------------------------------------- attributes
    def random_attributes(self, n: int, rng: np.random.Generator, **fixed: str) -> list[Attributes]:
        """Draw ``n`` attribute triples uniformly; keyword arguments (``colour="red"``) pin an attribute."""
        for attribute, value in fixed.items():
            if value not in self.vocab.classes(attribute):
                raise ValueError(
                    f"unknown {attribute} {value!r}: use one of {', '.join(self.vocab.classes(attribute))}"
                )
        columns = {}
        for attribute in ("colour", "shape", "style"):
            classes = self.vocab.classes(attribute)
            if attribute in fixed:
                columns[attribute] = [fixed[attribute]] * n
            else:
                columns[attribute] = [classes[i] for i in rng.integers(0, len(classes), size=n)]
        return [Attributes(c, s, f) for c, s, f in zip(columns["colour"], columns["shape"], columns["style"])]

    # ------------------------------------------------------------------------------------------------- drawing
    def draw(self, attributes: list[Attributes], rng: np.random.Generator) -> np.ndarray:
        """Render one image per attribute triple: ``uint8`` array of shape ``[N, H, W, 3]``."""
        n, res = len(attributes), self.resolution
        scale = res / 32
        radius = rng.uniform(*RADIUS_RANGE, size=n) * scale
        centre = np.stack([rng.uniform(radius + scale, res - radius - scale) for _ in range(2)], axis=1)
        fine = (np.arange(res * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        y, x = np.meshgrid(fine, fine, indexing="ij")
        dx = x[None] - centre[:, 0, None, None]
        dy = y[None] - centre[:, 1, None, None]
        r = radius[:, None, None]
        shapes = np.array([a.shape for a in attributes])
        outer = np.zeros(dx.shape, dtype=bool)
        inner = np.zeros(dx.shape, dtype=bool)
        outline = OUTLINE * scale
        for name in self.vocab.shapes:
            rows = shapes == name
            if rows.any():
                outer[rows] = shape_mask(name, dx[rows], dy[rows], r[rows])
                inner[rows] = shape_mask(name, dx[rows], dy[rows], r[rows] - outline)
        pattern = self._fill_pattern([a.style for a in attributes], x, y, scale, rng)
        coverage = outer & (pattern | ~inner)  # striped/dotted fills keep a solid outline so the shape reads
        alpha = coverage.reshape(n, res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(2, 4))[..., None]

        background = rng.uniform(25, 75, size=(n, 1, 1, 1))
        base = np.array([self.vocab.rgb(a.colour) for a in attributes], dtype=np.float64)
        colour = base * rng.uniform(0.85, 1.08, size=(n, 1)) + rng.normal(0, 10, size=(n, 3))
        image = background * (1 - alpha) + colour[:, None, None, :] * alpha
        image += rng.normal(0, 3.0, size=image.shape)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def _fill_pattern(self, styles, x, y, scale, rng) -> np.ndarray:
        n = len(styles)
        phase = rng.uniform(0, 8 * scale, size=(n, 2))
        px = x[None] + phase[:, 0, None, None]
        py = y[None] + phase[:, 1, None, None]
        period = FILL_PERIOD * scale
        stripes, dots = stripe_pattern(px, py, period), dot_pattern(px, py, period)
        kinds = np.array(styles)
        return np.where(
            (kinds == "solid")[:, None, None], True, np.where((kinds == "striped")[:, None, None], stripes, dots)
        )

    def draw_pool(self, n: int, rng: np.random.Generator, chunk: int = 1024) -> tuple[list[Attributes], np.ndarray]:
        """``n`` random attribute triples and their images, drawn in chunks (the training pool of every trainer)."""
        attrs = self.random_attributes(n, rng)
        return attrs, np.concatenate([self.draw(attrs[i : i + chunk], rng) for i in range(0, n, chunk)])

    # ------------------------------------------------------------------------------------------------ captions
    def caption(
        self, attributes: Attributes, rng: np.random.Generator, synonym_rate: float = 0.5
    ) -> tuple[str, tuple]:
        """A random caption for ``attributes`` and the attributes it names (a subset of colour/shape/style).

        Each word is the canonical one with probability ``1 - synonym_rate``, otherwise a random synonym.
        """
        templates = self.vocab.caption_templates
        template = templates[rng.integers(len(templates))]
        words = {
            "colour": pick_word(self.vocab.words("colour", attributes.colour), rng, synonym_rate),
            "shape": pick_word(self.vocab.words("shape", attributes.shape), rng, synonym_rate),
            "style": pick_word(self.vocab.words("style", attributes.style), rng, synonym_rate),
            "style_post": pick_word(self.vocab.style_postfixes(attributes.style), rng, 1.0),
        }
        return fix_articles(template["text"].format(**words)), tuple(template["uses"])

    def sample(self, n: int, seed: int, **fixed: str) -> tuple[np.ndarray, list[Attributes], list[str], list[tuple]]:
        """Draw ``n`` captioned images from one seed: ``(images, attributes, captions, named_attributes)``."""
        rng = np.random.default_rng(seed)
        attributes = self.random_attributes(n, rng, **fixed)
        images = self.draw(attributes, rng)
        pairs = [self.caption(a, rng) for a in attributes]
        return images, attributes, [p[0] for p in pairs], [p[1] for p in pairs]


def pick_word(words: list[str], rng: np.random.Generator, synonym_rate: float) -> str:
    """A caption's word for a class: the canonical one (``words[0]``) with probability ``1 - synonym_rate``, else a
    random synonym."""
    if len(words) == 1 or rng.random() >= synonym_rate:
        return words[0]
    return words[1 + rng.integers(len(words) - 1)]


def stripe_pattern(px: np.ndarray, py: np.ndarray, period: float) -> np.ndarray:
    """Diagonal bands along ``x + y``, half of ``2 * period`` wide: True where a stripe covers ``(px, py)``."""
    return ((px + py) / period) % 2 < 1.0


def dot_pattern(px: np.ndarray, py: np.ndarray, period: float) -> np.ndarray:
    """A square grid of dots of radius ``DOT_RADIUS * period``: True where a dot covers ``(px, py)``."""
    gx = (px % period) - period / 2
    gy = (py % period) - period / 2
    return gx**2 + gy**2 <= (DOT_RADIUS * period) ** 2


def shape_mask(name: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape of half-size ``r`` centred at the origin of ``(dx, dy)``."""
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if name == "triangle":  # upward-pointing isosceles triangle, base at +0.8 r, apex at -r
        top, bottom = -r, 0.8 * r
        half_width = (dy - top) / (bottom - top) * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    if name == "cross":
        arm = 0.34 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"the Shapes world cannot draw a {name!r}")
