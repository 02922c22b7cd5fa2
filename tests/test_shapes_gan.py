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


def test_the_shipped_gan_draws_recognisable_shapes_in_every_colour_and_shape():
    G = pipelines.load_gan("shapes")
    readings = ShapesOracle().read(sample_gan(G, 300, seed=0))
    good = [r for r in readings if r.recognisable]
    # the shipped file's table (2,000 latents): 94.8% recognisable, every colour >= 15.9%, every shape >= 19.7%
    assert len(good) / len(readings) >= 0.9
    colours, shapes = [r.colour for r in good], [r.shape for r in good]
    assert all(colours.count(c) / len(good) >= 0.1 for c in ("red", "orange", "yellow", "green", "blue", "purple"))
    assert all(shapes.count(s) / len(good) >= 0.14 for s in ("circle", "square", "triangle", "cross"))
    table = json.loads(read_metadata(WEIGHTS_DIR / "gan_shapes.safetensors")["erase.accuracy"])
    assert table["n"] == 2000 and abs(table["recognisable"] - len(good) / len(readings)) < 0.04
    assert all(table["passes"].values()) and table["colour_agreement"] >= 0.95


def test_latent_classes_are_uniform_and_read_from_the_first_coordinates():
    from pipelines.shapes.gan import latent_classes

    z = torch.randn(60_000, 64, generator=torch.Generator().manual_seed(0))
    labels = latent_classes(z, [6, 4, 3])
    assert labels.shape == (60_000, 3) and labels.dtype == torch.long
    for k, count in enumerate([6, 4, 3]):
        shares = torch.bincount(labels[:, k], minlength=count).float() / len(z)
        assert torch.allclose(shares, torch.full((count,), 1 / count), atol=0.01), (k, shares)
    z2 = z.clone()
    z2[:, 3:] = 0  # only the first len(counts) coordinates decide
    assert torch.equal(latent_classes(z2, [6, 4, 3]), labels)
    assert latent_classes(z, []).shape == (60_000, 0)


def test_a_conditional_generator_draws_its_class_from_the_latent():
    torch.manual_seed(0)
    G = ShapesGenerator(**generator_config(latent_classes=[6, 4, 3])).eval()
    z = torch.randn(2, 64)
    z[:, :3] = torch.tensor([[-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]])  # first and last class of each attribute
    assert G.classes_of(z).tolist() == [[0, 0, 0], [5, 3, 2]]
    swapped = z.flip(0).clone()
    swapped[:, 3:] = z[:, 3:]  # same free coordinates, other classes: another w
    assert not torch.allclose(G.to_w(z), G.to_w(swapped))
    assert ShapesGenerator(**generator_config()).classes_of(z).shape == (2, 0)


def test_the_labelled_pool_is_the_same_images_with_their_attributes():
    from pipelines.shapes.gan import ATTRIBUTES, training_pool
    from pipelines.shapes.world import ShapesWorld

    images = training_pool(4, 40)
    again, labels = training_pool(4, 40, labels=True)
    assert np.array_equal(images, again) and labels.shape == (40, 3)
    world = ShapesWorld()
    rng = np.random.default_rng([4, 0])
    attributes = world.random_attributes(40, rng)
    assert [world.vocab.classes(a)[i] for a, i in zip(ATTRIBUTES, labels[7])] == [
        attributes[7].get(a) for a in ATTRIBUTES
    ]


def test_a_conditional_gan_trains_and_its_discriminator_projects_the_classes():
    from pipelines.shapes.gan import Discriminator, GanTrainConfig, train_gan

    config = GanTrainConfig(steps=3, batch_size=8, pool_size=32, threads=1, conditional=True)
    assert config.class_counts() == [6, 4, 3] and config.generator_config()["latent_classes"] == [6, 4, 3]
    G, facts = train_gan(config, progress=False)
    assert np.isfinite(facts["g_final_loss"]) and G.mapping.classes == [6, 4, 3]
    torch.manual_seed(0)
    D = Discriminator(classes=[6, 4, 3])
    x = torch.randn(4, 3, 32, 32)
    a, b = torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)
    assert D(x, a).shape == (4,) and not torch.allclose(D(x, a), D(x, b))
