"""Procedural paintings of the Shapes Canvas world: one object painted in one artist's style, with captions.

A second embedded world in the mould of UnlearnCanvas (styles x objects): 24 made-up artists, each a painting
recipe (`prompts/data/canvas_world.json`: background gradient and lines, palette, fill texture, ink, outline), and 10
object classes. Four near-neighbour pairs differ in exactly one property (stripe angle, dot density, palette, check
size), the artist's case of similar styles. An object is painted in one colour of its style's palette, at a random
size and position, on the style's background.

Drawing is vectorised over the images of each style with numpy, at 3x supersampling averaged down, and is
deterministic for a given `numpy.random.Generator`. The interface is the Shapes world's (`random_attributes`, `draw`,
`draw_pool`, `caption`, `sample`), with the attributes ``style`` and ``object``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.shapes.world import pick_word
from prompts.canvas import ATTRIBUTES, CanvasVocab, load_canvas_vocab
from prompts.shapes import fix_articles

SUPERSAMPLE = 3
RADIUS_RANGE = (8.0, 13.0)  # half-size of an object at 32 px, drawn uniformly
LINE_WIDTH = 1.2  # width of grid, hatch and background lines at 32 px
LIGHT_INK = (246, 244, 234)
DARK_INK = 0.4  # a "dark" ink is the paint at this brightness
SPECKLE_SHARE = 0.3  # share of speckle texels that take the ink


@dataclass(frozen=True)
class CanvasAttributes:
    """What one Canvas image shows."""

    style: str
    object: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


class CanvasWorld:
    """Paints Canvas images and writes their captions.

    Args:
        resolution (`int`, *optional*, defaults to 32): image side in pixels (at least 32).
        vocab (`CanvasVocab`, *optional*): the world's vocabulary; the shipped one by default.
    """

    attributes = ATTRIBUTES

    def __init__(self, resolution: int = 32, vocab: CanvasVocab | None = None):
        if resolution < 32:
            raise ValueError(f"resolution {resolution} is too small: the Canvas world needs at least 32 pixels")
        self.resolution = resolution
        self.vocab = vocab or load_canvas_vocab()

    # ----------------------------------------------------------------------------------------------- attributes
    def random_attributes(self, n: int, rng: np.random.Generator, **fixed: str) -> list[CanvasAttributes]:
        """Draw ``n`` (style, object) pairs uniformly; keyword arguments (``style="Maren Quillfeather"``) pin one."""
        for attribute, value in fixed.items():
            if attribute not in ATTRIBUTES or value not in self.vocab.classes(attribute):
                raise ValueError(f"unknown {attribute} {value!r}: use one of the Canvas world's classes")
        columns = {}
        for attribute in ATTRIBUTES:
            classes = self.vocab.classes(attribute)
            if attribute in fixed:
                columns[attribute] = [fixed[attribute]] * n
            else:
                columns[attribute] = [classes[i] for i in rng.integers(0, len(classes), size=n)]
        return [CanvasAttributes(s, o) for s, o in zip(columns["style"], columns["object"])]

    # ------------------------------------------------------------------------------------------------- drawing
    def draw(self, attributes: list[CanvasAttributes], rng: np.random.Generator) -> np.ndarray:
        """Render one image per (style, object) pair: ``uint8`` array of shape ``[N, H, W, 3]``.

        Random draws happen for the whole batch first (sizes, positions, phases, colours), then images are painted
        style by style, so an image depends only on the generator's state and its place in the batch.
        """
        n, res = len(attributes), self.resolution
        scale = res / 32
        radius = rng.uniform(*RADIUS_RANGE, size=n) * scale
        centre = np.stack([rng.uniform(radius + scale, res - radius - scale) for _ in range(2)], axis=1)
        phase = rng.uniform(0, 16 * scale, size=(n, 2))
        paint_index = rng.integers(0, 3, size=n)
        paint_gain = rng.uniform(0.9, 1.06, size=(n, 1))
        paint_noise = rng.normal(0, 8, size=(n, 3))
        light = rng.uniform(0.92, 1.05, size=n)
        speckle = rng.random((n, res, res)) < SPECKLE_SHARE
        grain = rng.normal(0, 3.0, size=(n, res, res, 3))

        fine = (np.arange(res * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        y, x = np.meshgrid(fine, fine, indexing="ij")
        out = np.zeros((n, res, res, 3))
        styles = np.array([a.style for a in attributes])
        for style in dict.fromkeys(styles.tolist()):
            rows = np.flatnonzero(styles == style)
            recipe = self.vocab.recipe(style)
            palette = np.asarray(recipe["palette"], dtype=np.float64)
            paint = palette[paint_index[rows]] * paint_gain[rows] + paint_noise[rows]
            fine_image = self._paint(
                recipe,
                [attributes[i].object for i in rows],
                paint,
                x,
                y,
                centre[rows],
                radius[rows],
                phase[rows],
                light[rows],
                np.repeat(np.repeat(speckle[rows], SUPERSAMPLE, axis=1), SUPERSAMPLE, axis=2),
                scale,
            )
            out[rows] = fine_image.reshape(len(rows), res, SUPERSAMPLE, res, SUPERSAMPLE, 3).mean(axis=(2, 4))
        return np.clip(np.rint(out + grain), 0, 255).astype(np.uint8)

    def _paint(self, recipe, objects, paint, x, y, centre, radius, phase, light, speckle, scale) -> np.ndarray:
        """Supersampled ``[n, H', W', 3]`` float images of one style."""
        n = len(objects)
        top, bottom = (np.asarray(c, dtype=np.float64) for c in recipe["background"])
        t = (y / y.max())[None, ..., None]
        background = (top * (1 - t) + bottom * t) * light[:, None, None, None]
        background = np.broadcast_to(background, (n, *y.shape, 3)).copy()
        lines = recipe.get("background_lines")
        if lines:
            across = _across(x[None] + phase[:, 0, None, None], y[None] + phase[:, 1, None, None], lines["angle"])
            on = (across % (lines["period"] * scale)) < LINE_WIDTH * scale
            background[on] = np.broadcast_to(np.asarray(lines["colour"], dtype=np.float64), (n, *y.shape, 3))[on]

        dx = x[None] - centre[:, 0, None, None]
        dy = y[None] - centre[:, 1, None, None]
        r = radius[:, None, None]
        width = float(recipe.get("outline", {}).get("width", 0.0)) * scale
        names = np.array(objects)
        outer = np.zeros(dx.shape, dtype=bool)
        inner = np.zeros(dx.shape, dtype=bool)
        for name in dict.fromkeys(objects):
            rows = names == name
            outer[rows] = object_mask(name, dx[rows], dy[rows], r[rows], 0.0)
            inner[rows] = object_mask(name, dx[rows], dy[rows], r[rows], width) if width > 0 else outer[rows]

        image = background
        paint_layer = np.broadcast_to(paint[:, None, None, :], image.shape)
        image = np.where(outer[..., None], paint_layer, image)
        texture = recipe["texture"]
        ink_mask = self._texture(texture, x, y, dx, dy, phase, speckle, scale) & inner
        ink = texture.get("ink", "dark")
        if ink == "dark":
            ink_layer = paint_layer * DARK_INK
        elif ink == "light":
            ink_layer = np.broadcast_to(np.asarray(LIGHT_INK, dtype=np.float64), image.shape)
        elif ink == "bg":
            ink_layer = background
        else:
            ink_layer = np.broadcast_to(np.asarray(ink, dtype=np.float64), image.shape)
        image = np.where(ink_mask[..., None], ink_layer, image)
        if width > 0:
            colour = np.asarray(recipe["outline"]["colour"], dtype=np.float64)
            image = np.where((outer & ~inner)[..., None], colour, image)
        return image

    @staticmethod
    def _texture(texture, x, y, dx, dy, phase, speckle, scale) -> np.ndarray:
        kind = texture["kind"]
        px = x[None] + phase[:, 0, None, None]
        py = y[None] + phase[:, 1, None, None]
        period = float(texture.get("period", 4.0)) * scale
        if kind == "solid":
            return np.zeros(dx.shape, dtype=bool)
        if kind == "stripes":
            return (_across(px, py, texture["angle"]) / period) % 1.0 < 0.5
        if kind == "dots":
            gx, gy = (px % period) - period / 2, (py % period) - period / 2
            return gx**2 + gy**2 <= (texture["radius"] * period) ** 2
        if kind == "checks":
            return (np.floor(px / period) + np.floor(py / period)) % 2 == 1
        if kind == "grid":
            return ((px % period) < LINE_WIDTH * scale) | ((py % period) < LINE_WIDTH * scale)
        if kind == "hatch":
            line = LINE_WIDTH * scale * np.sqrt(2)
            return (((px + py) % period) < line) | (((px - py) % period) < line)
        if kind == "rings":
            return (np.sqrt(dx**2 + dy**2) / period) % 1.0 < 0.5
        if kind == "speckle":
            return speckle
        raise ValueError(f"unknown Canvas texture {kind!r}")

    def draw_pool(
        self, n: int, rng: np.random.Generator, chunk: int = 512
    ) -> tuple[list[CanvasAttributes], np.ndarray]:
        """``n`` random (style, object) pairs and their images, drawn in chunks (every trainer's training pool)."""
        attrs = self.random_attributes(n, rng)
        return attrs, np.concatenate([self.draw(attrs[i : i + chunk], rng) for i in range(0, n, chunk)])

    # ------------------------------------------------------------------------------------------------ captions
    def caption(
        self, attributes: CanvasAttributes, rng: np.random.Generator, synonym_rate: float = 0.3
    ) -> tuple[str, tuple]:
        """A random caption for ``attributes`` and the attributes it names.

        Words are canonical with probability ``1 - synonym_rate``, else a random synonym (a surname, "disc"). A style
        with descriptions is described instead of named in a share ``description_rate`` of its captions that name
        it, so a generator learns the description as well as the name.
        """
        vocab = self.vocab
        templates = vocab.caption_templates
        template = templates[rng.integers(len(templates))]
        descriptions = vocab.descriptions(attributes.style)
        description = ""
        if "style" in template["uses"] and descriptions and rng.random() < vocab.raw["description_rate"]:
            options = vocab.description_templates
            template = options[0] if "object" in template["uses"] else options[1]
            description = descriptions[rng.integers(len(descriptions))]
        words = {
            "style": pick_word(vocab.words("style", attributes.style), rng, synonym_rate),
            "object": pick_word(vocab.words("object", attributes.object), rng, synonym_rate),
            "description": description,
        }
        return fix_articles(template["text"].format(**words)), tuple(template["uses"])

    def sample(
        self, n: int, seed: int, **fixed: str
    ) -> tuple[np.ndarray, list[CanvasAttributes], list[str], list[tuple]]:
        """Draw ``n`` captioned images from one seed: ``(images, attributes, captions, named_attributes)``."""
        rng = np.random.default_rng(seed)
        attributes = self.random_attributes(n, rng, **fixed)
        images = self.draw(attributes, rng)
        pairs = [self.caption(a, rng) for a in attributes]
        return images, attributes, [p[0] for p in pairs], [p[1] for p in pairs]


def _across(px: np.ndarray, py: np.ndarray, angle: float) -> np.ndarray:
    """The coordinate across bands that run at ``angle`` degrees (0: horizontal bands, 90: vertical)."""
    theta = np.deg2rad(angle)
    return -px * np.sin(theta) + py * np.cos(theta)


_STAR_TIP = 1.0
_STAR_INNER = 0.45


def object_mask(name: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, erode: float) -> np.ndarray:
    """Boolean mask of an object of half-size ``r`` centred at the origin of ``(dx, dy)``, shrunk by ``erode``
    pixels from its edge (the inside of an outline of that width)."""
    e = erode
    d = np.sqrt(dx**2 + dy**2)
    if name == "circle":
        return d <= r - e
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r - e
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= r - e * np.sqrt(2)
    if name == "ring":
        return (d <= r - e) & (d >= 0.5 * r + e)
    if name == "crescent":  # a disc with an offset disc cut out, opening to the upper right
        cut = np.sqrt((dx - 0.45 * r) ** 2 + (dy + 0.25 * r) ** 2)
        return (d <= r - e) & (cut >= 0.78 * r + e)
    if name == "hexagon":  # flat top and bottom
        return np.maximum(np.abs(dy), np.abs(dx) * 0.866 + np.abs(dy) * 0.5) <= 0.87 * r - e
    if name == "triangle":  # upward-pointing isosceles triangle, base at +0.8 r, apex at -r
        top, bottom = -r + 2 * e, 0.8 * r - e
        half_width = (dy - top) / (bottom - top) * (r - 1.7 * e)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    if name == "cross":
        arm = 0.34 * r - e
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r - e)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r - e))
    if name == "star":  # five points, the first pointing up; inside the edge from each tip to its inner corners
        outer = r * _STAR_TIP - 2.2 * e
        inner = r * _STAR_INNER - 0.8 * e
        sector = 2 * np.pi / 5
        phi = np.abs((np.arctan2(dx, -dy) + sector / 2) % sector - sector / 2)
        u, v = d * np.cos(phi), d * np.sin(phi)
        p2x, p2y = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
        return (p2x - outer) * v - p2y * (u - outer) >= 0
    if name == "arrow":  # pointing right: a shaft and a triangular head
        shaft = (np.abs(dy) <= 0.26 * r - e) & (dx >= -r + e) & (dx <= 0.1 * r)
        tip = r - 1.8 * e
        head = (dx >= -0.05 * r + e) & (np.abs(dy) <= (tip - dx) * 0.75)
        return shaft | head
    raise ValueError(f"the Canvas world cannot draw a {name!r}")
