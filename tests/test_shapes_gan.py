"""The Shapes GAN (`pipelines.shapes.gan`): layer groups, standing statistics and the shipped generator's quality."""

import json

import numpy as np
import torch

import pipelines
from eval.oracle import ShapesOracle
from pipelines.sampling import sample_gan
from pipelines.shapes.clip import WEIGHTS_DIR
from pipelines.shapes.gan import ShapesGenerator, generator_config, standing_stats
from pipelines.shapes.io import read_metadata


def test_layer_groups_partition_the_synthesis_parameters():
    for modulated in (False, True):
        G = ShapesGenerator(**generator_config(modulated=modulated))
        groups = G.synthesis.layer_groups()
        names = [n for group in groups.values() for n in group]
        assert sorted(names) == sorted(n for n, _ in G.synthesis.named_parameters())
        assert list(groups)[0] == "input" and list(groups)[-1] == "torgb" and "b32" in groups
        assert G.num_ws == (len(G.synthesis.blocks) if modulated else 1)


def test_standing_statistics_make_samples_independent_of_their_batch():
    torch.manual_seed(0)
    G = standing_stats(ShapesGenerator(**generator_config()), batches=2, batch_size=32)
    z = torch.randn(8, G.z_dim)
    with torch.no_grad():
        alone, in_batch = G(z[:1]), G(z)[:1]
    assert not G.training and torch.allclose(alone, in_batch, atol=1e-6)
    norms = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.num_batches_tracked.item() == 2 for m in norms)


def test_the_shipped_gan_draws_recognisable_shapes_in_every_colour():
    G = pipelines.load_gan("shapes")
    readings = ShapesOracle().read(sample_gan(G, 300, seed=0))
    good = [r for r in readings if r.recognisable]
    # the shipped file's table (2,000 latents): 71.6% recognisable, every colour >= 12% of those
    assert len(good) / len(readings) >= 0.6
    colours = [r.colour for r in good]
    assert all(colours.count(c) / len(good) >= 0.06 for c in ("red", "orange", "yellow", "green", "blue", "purple"))
    table = json.loads(read_metadata(WEIGHTS_DIR / "gan_shapes.safetensors")["erase.accuracy"])
    assert table["n"] == 2000 and abs(table["recognisable"] - len(good) / len(readings)) < 0.08
    assert np.isfinite(table["colour_agreement"])
