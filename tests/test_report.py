"""The report helpers of `eval.report`: text wrapping of grid captions (linear in the text, nothing lost) and the
trade-off plot's layout."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from eval.report import _wrap, save_grid


class CountingDraw(ImageDraw.ImageDraw):
    """A real ImageDraw that counts the text it measures (calls and characters)."""

    def __init__(self):
        super().__init__(Image.new("RGB", (1, 1)))
        self.calls = self.chars = 0

    def textlength(self, text, *args, **kwargs):
        self.calls += 1
        self.chars += len(text)
        return super().textlength(text, *args, **kwargs)


def _measured(text: str, width: int = 128, max_lines=None) -> tuple[list[str], CountingDraw]:
    draw = CountingDraw()
    return _wrap(text, draw, ImageFont.load_default(), width, max_lines), draw


def test_a_15000_character_prompt_wraps_in_work_linear_in_its_length():
    font = ImageFont.load_default()
    for unit in ("x", "a red striped circle "):  # one endless word, and many short ones
        text = (unit * (15_000 // len(unit) + 1))[:15_000]
        lines, draw = _measured(text)
        assert all(draw.textlength(line, font=font) <= 128 for line in lines)
        if unit == "x":  # a word wider than a line is broken across lines, losing no character
            assert len(lines) > 100 and "".join(lines) == text
        else:
            assert " ".join(lines).split() == text.split()
        # the old wrap measured 1.1e8 characters for the long word (a character at a time, 12 minutes in erase eval)
        assert draw.chars < 40 * len(text) and draw.calls < len(text)
        _, tenth = _measured(text[:1_500])
        assert draw.chars < 15 * tenth.chars  # ten times the text, about ten times the work (quadratic: 100)


def test_max_lines_cuts_each_paragraph_and_marks_the_cut():
    lines, draw = _measured("x" * 15_000 + "\nseed 3", max_lines=6)
    assert len(lines) == 7 and lines[5].endswith("…") and lines[6] == "seed 3"
    assert draw.chars < 50 * 128  # a capped caption costs a few lines' work, not the whole word's
    short, _ = _measured("a red circle\nseed 3", max_lines=6)
    assert short == ["a red circle", "seed 3"]  # nothing cut, no mark


def test_a_very_long_caption_does_not_stretch_the_grid(tmp_path):
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    short = Image.open(save_grid(images, tmp_path / "short.png", captions=["a red circle\nseed 1"] * 2, cols=2))
    long = ["x" * 15_000 + "\nseed 1", "a red circle\nseed 2"]
    capped = Image.open(save_grid(images, tmp_path / "long.png", captions=long, cols=2))
    assert short.size[0] == capped.size[0] and short.size[1] < capped.size[1] < 3 * short.size[1]
