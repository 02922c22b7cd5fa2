"""Load base models (diffusers pipelines, GAN generators, the Shapes world) and apply patches to them."""
