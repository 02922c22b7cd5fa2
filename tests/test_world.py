import numpy as np
import pytest

from pipelines.shapes.world import ShapesWorld
from prompts.shapes import ATTRIBUTES, load_shapes_vocab


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_same_seed_same_images_and_captions(world):
    a = world.sample(16, seed=3)
    b = world.sample(16, seed=3)
    c = world.sample(16, seed=4)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_images_are_rgb_uint8_of_the_requested_resolution(world):
    images = world.sample(4, seed=0)[0]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert ShapesWorld(resolution=48).sample(2, seed=0)[0].shape == (2, 48, 48, 3)


def test_vocabulary_meets_the_world_spec():
    vocab = load_shapes_vocab()
    assert len(vocab.colours) >= 6 and {"red", "orange"} <= set(vocab.colours)
    assert len(vocab.shapes) >= 4 and len(vocab.styles) >= 3
    assert "crimson" in vocab.synonyms("colour", "red") and "disc" in vocab.synonyms("shape", "circle")
    assert "with stripes" in vocab.style_postfixes("striped")


def test_every_attribute_value_and_caption_kind_occurs(world):
    _, attrs, captions, named = world.sample(600, seed=11)
    vocab = world.vocab
    for attribute in ATTRIBUTES:
        assert {a.get(attribute) for a in attrs} == set(vocab.classes(attribute))
    kinds = {tuple(sorted(n)) for n in named}
    assert ("colour", "shape", "style") in kinds and ("shape",) in kinds and ("colour",) in kinds
    assert any("crimson" in c or "scarlet" in c for c in captions)


def test_captions_name_what_was_drawn(world):
    _, attrs, captions, named = world.sample(300, seed=5)
    vocab = world.vocab
    for a, caption, uses in zip(attrs, captions, named):
        for attribute in uses:
            value = a.get(attribute)
            words = vocab.words(attribute, value) + (vocab.style_postfixes(value) if attribute == "style" else [])
            assert any(w in caption for w in words), (caption, a)
        assert " a a" not in f" {caption}" and not any(f" a {v}" in f" {caption}" for v in "aeiou")


def test_pinned_attributes_and_colour_really_drawn(world):
    images, attrs, _, _ = world.sample(40, seed=1, colour="red", shape="circle")
    assert all(a.colour == "red" and a.shape == "circle" for a in attrs)
    # red objects: the brightest pixels are red-dominant
    flat = images.reshape(40, -1, 3).astype(int)
    brightest = flat[np.arange(40), flat.sum(-1).argmax(1)]
    assert (brightest[:, 0] > brightest[:, 1] + 80).all()


def test_styles_differ_in_how_much_of_the_object_is_coloured(world):
    rng = np.random.default_rng(0)
    coverage = {}
    for style in world.vocab.styles:
        attrs = world.random_attributes(30, rng, shape="square", style=style)
        images = world.draw(attrs, rng).astype(int)
        coverage[style] = (np.abs(images - images[:, :1, :1]).sum(-1) > 90).mean()
    assert coverage["solid"] > coverage["striped"] > coverage["dotted"] > 0


def test_bad_input_is_refused_with_a_clear_message(world):
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        world.sample(2, seed=0, colour="teal")
    with pytest.raises(ValueError, match="at least 32"):
        ShapesWorld(resolution=16)
