"""Which LoRA client applies which erase LoRA file, and how exactly: the table of issue 18, measured.

For an SD 1.5-architecture model (real SD 1.5 shapes: a UNet and a CLIP-L text encoder built on the meta device and
materialised with zero weights, so a client's weight after loading *is* the change it applied; ``--shape tiny`` for
the test-sized model) it writes four erase LoRA patches:

- ``uce``: cross-attention K/V (32 modules), rank = alpha (360 at SD 1.5 shapes), as UCE writes;
- ``doco``: the same modules at rank 4, alpha 8 (scale 2), as DoCo/ESD write with ``--rank 4 --lora-alpha 8``;
- ``svd-mixed``: a rank-360 delta on those modules exported with ``delta_to_lora`` at rank 400: the 320-wide modules
  keep rank 320, the others 400 (mixed ranks, alpha = rank each);
- ``te+conv``: every text-encoder attention projection (rank 8, alpha 4) and the UNet's first resnet conv (3x3, rank
  4, alpha 4): text-encoder keys and a conv LoRA, scales 0.5 and 1 in one file;

each in three files: ``peft-v1`` (PEFT keys with the alpha in diffusers' header: erase's default before format 2),
``kohya`` (the default now) and ``peft`` (``erase export --to peft``: scale folded into lora_B, alpha = r). Each
client loads each file its own way; per (client, case, file) it prints the modules it changed out of the patch's,
the largest absolute difference from erase's weight change (``scale * B @ A``), and the fitted strength ``s`` in
``client = s * erase`` (global, then the per-module range), plus weights changed outside the patch.

Clients: diffusers as installed, diffusers 0.33.1 + peft 0.15.2 and 0.30.3 + peft 0.13.2 (separate environments
from PyPI reusing this torch, as tests/old_stack.py builds them; ``--no-old`` skips), InvokeAI 6.14 (its own model
probe, key conversion and ``LayerPatcher``; installed with ``--no-deps`` plus the few modules those import into a
cache folder; ``--no-invokeai`` skips), and from their documented conventions (tests/lora_conventions.py): kohya
sd-scripts' merge, ComfyUI's key map, AUTOMATIC1111's key matching with its ``alpha / dim`` scale.

Run: ``.venv/bin/python benchmarks/lora_clients.py [--shape sd15|tiny] [--no-old] [--no-invokeai]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

OLD_STACKS = {
    "diffusers 0.33.1 + peft 0.15.2": (
        "diffusers==0.33.1",
        "peft==0.15.2",
        "transformers==4.55.4",
        "tokenizers==0.21.4",
        "huggingface_hub==0.34.4",
        "accelerate==1.10.1",
        "kernels==0.9.0",  # transformers 4.55 imports kernels if present; this environment's needs a newer hub
    ),
    "diffusers 0.30.3 + peft 0.13.2": (
        "diffusers==0.30.3",
        "peft==0.13.2",
        "transformers==4.55.4",
        "tokenizers==0.21.4",
        "huggingface_hub==0.34.4",
        "accelerate==1.10.1",
        "kernels==0.9.0",
    ),
}
INVOKEAI = (
    "invokeai==6.14.2",
    "transformers==5.5.4",  # InvokeAI 6.14's pin (its CLIPTextModel still has the text_model level 5.25 dropped)
    "kernels==0.12.3",
    "huggingface_hub==1.33.0",
    "tokenizers==0.22.2",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "sniffio",
    "pydantic-settings",
    "python-dotenv",
    "gguf",
    "picklescan",
    "blake3",
    "einops",
    "deprecated",
    "wrapt",
    "spandrel",
    "onnx",
    "ml_dtypes",
    "compel",
    "pyparsing",
)
SHAPES = {
    "sd15": {
        "unet": {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
        "uce_rank": 360,
        "svd_rank": 400,
    },
    "tiny": {
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "sample_size": 8,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
        },
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
        "uce_rank": 24,
        "svd_rank": 48,
    },
}

# Runs in a clean process under any diffusers version (or with InvokeAI on the path): builds the zero-weight model,
# lets the client load each file, and saves every weight that is not zero afterwards.
WORKER = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
import diffusers, transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
job = json.loads(sys.argv[1])
text_config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **job["text"])

def zero(module):
    module.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.zero_()
    return module.eval()

with torch.device("meta"):
    unet = UNet2DConditionModel(**job["unet"])
    text_encoder = transformers.CLIPTextModel(text_config)
unet, text_encoder = zero(unet), zero(text_encoder)
components = {"unet": unet, "text_encoder": text_encoder}

def changed():
    out = {}
    for name, module in components.items():
        for key, value in module.state_dict().items():
            if ".lora" not in key and value.is_floating_point() and value.any():
                out[f"{name}.{key.replace('.base_layer.', '.')}"] = value.detach().clone().contiguous()
    return out

def reset():
    for module in components.values():
        with torch.no_grad():
            for t in module.parameters():
                t.zero_()

results = {"versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__}}
if job["client"] == "diffusers":
    import peft
    results["versions"]["peft"] = peft.__version__
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(), text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for name, path in job["files"].items():
        try:
            folder, weight_name = path.rsplit("/", 1)  # offline, diffusers < 0.34 needs weight_name for a file
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="x")
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            save_file(changed(), f"{job['out']}/{name}.safetensors")
            results[name] = "ok"
        except Exception as err:
            results[name] = "error: " + (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            try:
                pipe.unload_lora_weights()
            except Exception:
                pass
        reset()
else:  # InvokeAI: its probe decides whether it installs the file at all, then its own loader and patcher
    from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
    from invokeai.backend.patches.layer_patcher import LayerPatcher
    from invokeai.backend.patches.lora_conversions.sd_lora_conversion_utils import lora_model_from_sd_state_dict
    from safetensors.torch import load_file
    for name, path in job["files"].items():
        try:
            found = ModelConfigFactory.from_model_on_disk(path)
            config = getattr(found, "config", None)
            kind = type(config).__name__ if config is not None else "None"
            if config is None or "Unknown" in kind or "LoRA" not in kind:
                results[name] = f"refused at install (probe: {kind})"
                continue
            model = lora_model_from_sd_state_dict(load_file(path))
            with LayerPatcher.apply_smart_model_patches(model=unet, patches=[(model, 1.0)], prefix="lora_unet_",
                                                       dtype=torch.float32, force_direct_patching=True), \
                 LayerPatcher.apply_smart_model_patches(model=text_encoder, patches=[(model, 1.0)], prefix="lora_te_",
                                                       dtype=torch.float32, force_direct_patching=True):
                save_file(changed(), f"{job['out']}/{name}.safetensors")
            restored = not changed()
            results[name] = f"ok ({kind}; weights restored after use: {restored})"
        except Exception as err:
            results[name] = "error: " + (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        reset()
json.dump(results, open(f"{job['out']}/results.json", "w"))
"""


# ----------------------------------------------------------------------------------------------------------------
# The model and the patches


def build_components(shape: dict) -> dict[str, torch.nn.Module]:
    """The zero-weight UNet and text encoder, as the worker builds them (this process: erase's side)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**shape["unet"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **shape["text"]))
    out = {}
    for name, module in (("unet", unet), ("text_encoder", text)):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                t.zero_()
        out[name] = module.eval()
    return out


def make_patches(components: dict, shape: dict) -> dict:
    """The four erase LoRA patches of the module docstring (random factors, fixed seeds)."""
    from lora_conventions import layers

    from erase.lora_export import delta_to_lora
    from erase.patch import make_delta_patch, make_lora_patch

    g = torch.Generator().manual_seed(0)
    base = {c: m.state_dict() for c, m in components.items()}
    kv = [n for n in layers(components["unet"]) if n.endswith(("attn2.to_k", "attn2.to_v"))]
    in_dim = base["unet"][kv[0] + ".weight"].shape[1]

    def factors(modules, component, rank, scale=0.02):
        out = {}
        for m in modules:
            w = base[component][m + ".weight"]
            down = torch.randn(rank, *w.shape[1:], generator=g) * scale
            out[m] = (down, torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * scale)
        return out

    uce_rank = min(shape["uce_rank"], in_dim)
    patches = {
        "uce": make_lora_patch(base, {"unet": factors(kv, "unet", uce_rank)}, lora_alpha=float(uce_rank)),
        "doco": make_lora_patch(base, {"unet": factors(kv, "unet", 4)}, lora_alpha=8.0),
    }
    low = factors(kv, "unet", uce_rank)
    tuned = {"unet": {m + ".weight": base["unet"][m + ".weight"] + b @ a for m, (a, b) in low.items()}}
    patches["svd-mixed"], _ = delta_to_lora(make_delta_patch(base, tuned), min(shape["svd_rank"], in_dim))
    te = [n for n in layers(components["text_encoder"]) if ".self_attn." in n]
    conv = [next(n for n in layers(components["unet"]) if n.endswith("resnets.0.conv1"))]
    te_factors = {"text_encoder": factors(te, "text_encoder", 8), "unet": factors(conv, "unet", 4)}
    alphas = {f"text_encoder.{m}": 4.0 for m in te} | {f"unet.{m}": 4.0 for m in conv}
    patches["te+conv"] = make_lora_patch(base, te_factors, lora_alpha=alphas)
    return patches


def write_files(patches: dict, folder: Path) -> dict[str, Path]:
    from erase.lora_export import lora_to_peft
    from erase.patch import save_patch

    files = {}
    for case, patch in patches.items():
        files[f"{case}/peft-v1"] = save_patch(patch, folder / f"{case}-peft-v1.safetensors", lora_layout="peft")
        files[f"{case}/kohya"] = save_patch(patch, folder / f"{case}-kohya.safetensors")
        files[f"{case}/peft"] = save_patch(
            lora_to_peft(patch), folder / f"{case}-peft.safetensors", lora_layout="peft"
        )
    return files


# ----------------------------------------------------------------------------------------------------------------
# Clients


def run_worker(python: str | Path, job: dict, extra_path: list[str] | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the client's own stack, not this checkout
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(extra_path)
    env["INVOKEAI_ROOT"] = job["out"]
    done = subprocess.run(
        [str(python), "-c", WORKER, json.dumps(job)], capture_output=True, text=True, env=env, cwd=job["out"]
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(Path(job["out"], "results.json").read_text())


def build_invokeai() -> Path | None:
    """An environment with InvokeAI, the transformers and diffusers it pins, and the few small modules its LoRA
    probe and patcher import, all with --no-deps beside this torch (tests/old_stack.py's mechanism); its python."""
    from old_stack import build_old_stack, default_env_dir

    try:
        return build_old_stack(default_env_dir(INVOKEAI), INVOKEAI)
    except subprocess.CalledProcessError:
        return None


def convention_clients(components: dict, files: dict[str, Path]) -> dict[str, dict]:
    """sd-scripts, ComfyUI and A1111 from their conventions: per file, the weight change per module."""
    from lora_conventions import a1111_compvis_name, a1111_table, comfyui_table, kohya_deltas, read, sd_scripts_table

    tables = {
        "kohya sd-scripts (convention)": sd_scripts_table(components, sdxl=False),
        "ComfyUI (key map convention)": comfyui_table(components, sdxl=False),
    }
    a1111 = a1111_table(components)
    out = {}
    for client, table in tables.items():
        out[client] = {}
        for name, path in files.items():
            deltas, _ = kohya_deltas(read(path), table)
            out[client][name] = {f"{c}.{m}.weight": d for (c, m), d in deltas.items()}
    out["AUTOMATIC1111 (key matching)"] = {}
    for name, path in files.items():
        state = read(path)
        renamed = {}
        for key, tensor in state.items():  # A1111 splits at the first dot and converts the module name
            stem, _, part = key.partition(".")
            renamed[f"{a1111_compvis_name(stem)}.{part}"] = tensor
        deltas, _ = kohya_deltas(renamed, a1111)
        out["AUTOMATIC1111 (key matching)"][name] = {f"{c}.{m}.weight": d for (c, m), d in deltas.items()}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Comparing with erase


def _plain(key: str) -> str:
    """transformers 4.x and up to 5.5 nest CLIP under ``text_model.``, later 5.x do not: compare without it."""
    component, _, name = key.partition(".")
    return f"{component}.{name.removeprefix('text_model.')}" if component.startswith("text_encoder") else key


def compare(patch, changed: dict[str, torch.Tensor]) -> dict:
    """Modules changed / in the patch, max |client - erase|, fitted strengths, and weights changed outside it."""
    expected = {_plain(f"{c}.{n}"): patch.dense_delta(c, n) for c in patch.targets for n in patch.target_names(c)}
    changed = {_plain(k): v for k, v in changed.items()}
    applied, worst, dot, norm, per_module = 0, 0.0, 0.0, 0.0, []
    for key, want in expected.items():
        got = changed.get(key, torch.zeros_like(want)).to(torch.float64)
        want = want.to(torch.float64)
        applied += bool(got.any())
        worst = max(worst, (got - want).abs().max().item())
        dot, norm = dot + (got * want).sum().item(), norm + (want * want).sum().item()
        per_module.append((got * want).sum().item() / (want * want).sum().item())
    stray = sorted(k for k in changed if k not in expected)
    return {
        "applied": applied,
        "modules": len(expected),
        "max_abs_diff": worst,
        "strength": dot / norm if norm else 0.0,
        "strength_range": (min(per_module), max(per_module)),
        "stray": len(stray),
    }


def cell(result: dict | str) -> str:
    if isinstance(result, str):
        return result
    low, high = result["strength_range"]
    spread = f" [{low:.3f}..{high:.3f}]" if abs(high - low) > 1e-4 else ""
    stray = f", {result['stray']} stray" if result["stray"] else ""
    exact = "exact" if result["max_abs_diff"] == 0 else f"diff {result['max_abs_diff']:.1g}"
    return f"{result['applied']}/{result['modules']} modules, {exact}, s={result['strength']:.3f}{spread}{stray}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sd15", help="model shapes (default: SD 1.5)")
    parser.add_argument("--no-old", action="store_true", help="skip the diffusers 0.30/0.33 stacks")
    parser.add_argument("--no-invokeai", action="store_true", help="skip InvokeAI")
    parser.add_argument("--no-current", action="store_true", help="skip the installed diffusers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    from old_stack import build_old_stack, default_env_dir
    from safetensors.torch import load_file

    shape = SHAPES[args.shape]
    components = build_components(shape)
    patches = make_patches(components, shape)
    print(f"shape {args.shape}; built in {time.perf_counter() - start:.0f} s")
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="erase-lora-clients-") as tmp:
        folder = Path(tmp)
        files = write_files(patches, folder)
        reference = {name: patches[name.split("/")[0]] for name in files}  # erase's own weight change
        clients: dict[str, tuple] = {}
        if not args.no_current:
            clients["diffusers (this stack)"] = (sys.executable, "diffusers", None)
        if not args.no_old:
            for label, pins in OLD_STACKS.items():
                try:
                    clients[label] = (build_old_stack(default_env_dir(pins), pins), "diffusers", None)
                except subprocess.CalledProcessError as err:
                    rows[label] = {"error": f"could not build ({err})"}
        if not args.no_invokeai:
            invokeai = build_invokeai()
            if invokeai is None:
                rows["InvokeAI 6.14"] = {"error": "could not install from PyPI"}
            else:
                clients["InvokeAI 6.14.2"] = (invokeai, "invokeai", None)
        for label, (python, kind, extra) in clients.items():
            out = folder / label.replace(" ", "_").replace("+", "")
            out.mkdir()
            job = {
                "client": kind,
                "unet": shape["unet"],
                "text": shape["text"],
                "files": {n.replace("/", "__"): str(p) for n, p in files.items()},
                "out": str(out),
            }
            t0 = time.perf_counter()
            results = run_worker(python, job, extra)
            rows[label] = {}
            if "error" in results:
                rows[label] = {"error": results["error"]}
                continue
            label_versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
            print(f"{label}: {label_versions}; {time.perf_counter() - t0:.0f} s")
            for name in files:
                status = results.get(name.replace("/", "__"), "no result")
                saved = out / f"{name.replace('/', '__')}.safetensors"
                if not status.startswith("ok") or not saved.exists():
                    rows[label][name] = status
                    continue
                rows[label][name] = compare(reference[name], load_file(str(saved)))
                if status != "ok":
                    rows[label][name]["note"] = status[3:]
        for label, per_file in convention_clients(components, files).items():
            rows[label] = {name: compare(reference[name], changed) for name, changed in per_file.items()}
    print()
    kinds = ("peft-v1", "kohya", "peft")
    header = {"peft-v1": "PEFT keys (erase < format 2)", "kohya": "kohya keys (default now)", "peft": "--to peft"}
    for case in patches:
        print(f"== {case}")
        print(f"{'client':<34}" + "".join(f"{header[k]:<58}" for k in kinds))
        for label, per_file in rows.items():
            if "error" in per_file:
                print(f"{label:<34}{per_file['error']}")
                continue
            print(f"{label:<34}" + "".join(f"{cell(per_file[f'{case}/{k}']):<58}" for k in kinds))
        notes = {r.get("note") for p in rows.values() for r in p.values() if isinstance(r, dict) and r.get("note")}
        if notes:
            print("  InvokeAI: " + "; ".join(sorted(notes)))
        print()
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
