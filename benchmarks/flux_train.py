"""One concept by a trained method on the Flux.1-dev architecture, random weights: wall time and peak memory.

Issue 21's real-size goal for trained methods: on the full Flux.1-dev architecture (transformer 19 double + 38
single blocks, 3072 wide; T5-XXL; CLIP-L; the 16-channel VAE) with random weights, one concept in <= 5 minutes and
<= 40 GB, reported with the card. The pipeline is built in memory (no download: random weights are enough for time
and memory) on the chosen device and trained by the product's own `train_patch` with the method's defaults for a
model that is none of the worlds, in bf16 (`--dtype`, as the issue asks): the trained tensors train as fp32 copies
and every layer computes in fp32 over its bf16 storage (`erase.training.student.fp32_compute`); only the trained
tensors are copied (`erase.training.student.shared_copy`).

Reported: the method's seconds (sampling its images or trajectories, then its training steps), peak memory (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set), the transformer's parameters and the
patch's values, the device. ``--double-blocks``/``--single-blocks``/``--t5-layers`` shrink the depth (the width
stays Flux.1-dev's) so that the same script runs on a CPU; the full architecture needs a GPU (in bf16: 24 GB of
transformer and 9.5 GB of T5-XXL).

Run: ``.venv/bin/python benchmarks/flux_train.py --device cuda [--method guard] [--size 512]`` on a GPU, or
``--device cpu --method esd --double-blocks 1 --single-blocks 1 --t5-layers 1 --size 256 --steps 2
--sample-steps 2`` to check it here (README, "SD3 and Flux", gives what it printed).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

FLUX_DEV = {  # FluxTransformer2DModel's config of black-forest-labs/FLUX.1-dev
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def flux_dev_pipeline(double_blocks: int, single_blocks: int, t5_layers: int):
    """A `FluxPipeline` of Flux.1-dev's shapes with random weights, built in the current default device/dtype."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from pipelines.shapes.flux import world_words
    from pipelines.tokenizer import clip_tokenizer, t5_style_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        **{**FLUX_DEV, "num_layers": double_blocks, "num_single_layers": single_blocks}
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=t5_layers,
            num_heads=64,
            feed_forward_proj="gated-gelu",
        )
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_style_tokenizer(world_words(), max_length=512),  # the prompts are the Shapes set's
        transformer=transformer.eval(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", default="guard", help="a trained method: guard, esd, salun or doco")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (Flux.1-dev: 1024 native)")
    parser.add_argument("--double-blocks", type=int, default=19)
    parser.add_argument("--single-blocks", type=int, default=38)
    parser.add_argument("--t5-layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    parser.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default: the method's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the model's dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from erase.registry import get_config
    from erase.training.run import train_patch

    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    try:
        with torch.device(args.device):
            pipe = flux_dev_pipeline(args.double_blocks, args.single_blocks, args.t5_layers)
    finally:
        torch.set_default_dtype(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = args.size // pipe.vae_scale_factor
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in pipe.transformer.parameters())
    # what a trained copy of the transformer costs: its own tensors (`shared_copy`) against a whole copy
    from erase.targets import resolve
    from erase.training.student import Student

    student = Student(pipe.transformer, resolve("text-in", "transformer", pipe.transformer), "delta")
    shared = {p.untyped_storage().data_ptr() for p in pipe.transformer.parameters()}
    own = [p for p in student.module.parameters() if p.untyped_storage().data_ptr() not in shared]
    own_gb = sum(p.numel() * p.element_size() for p in own) / 2**30
    whole_gb = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()) / 2**30
    del student, own
    settings = {"steps": args.steps, "sample_steps": args.sample_steps} if args.method != "uce" else {}
    config = get_config(args.method)(
        model="flux-dev-random",
        concepts=[args.concept],
        prompts="shapes",
        model_dtype=args.dtype,
        **{k: v for k, v in settings.items() if v is not None},
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    patch = train_patch(args.method, config, pipe=pipe, progress=True)
    train_s = time.perf_counter() - started
    if args.device.startswith("cuda"):
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
        device = torch.cuda.get_device_name()
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB
        device = "cpu"
    trained = sum(t.numel() for name, t in patch.tensors.items() if not name.endswith(("mask", "scale")))
    print(
        json.dumps(
            {
                "method": args.method,
                "dtype": args.dtype,
                "device": device,
                "blocks": [args.double_blocks, args.single_blocks],
                "t5_layers": args.t5_layers,
                "size": args.size,
                "transformer_params_b": round(params / 1e9, 3),
                "patch_values_m": round(trained / 1e6, 2),
                "text_in_copy_gb": round(own_gb, 3),
                "whole_copy_gb": round(whole_gb, 3),
                "steps": patch.config.get("steps"),
                "build_s": round(build_s, 1),
                "train_s": round(train_s, 1),
                "peak_gb": round(peak_gb, 2),
                "goal": "full architecture: <= 300 s and <= 40 GB",
            }
        )
    )


if __name__ == "__main__":
    main()
