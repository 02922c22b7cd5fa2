"""Shared machinery of the diffusion and GAN trainers: configs, data, the training loop, checkpoints, outputs.

Methods (``erase.methods.*``) build on these primitives and keep their own loss and update rule readable in one file.
"""
