"""The LoRA file erase writes by default (kohya keys, `erase.lora_format`) in each client's convention.

diffusers is run as installed (``pipe.load_lora_weights`` on tiny SD 1.x and SDXL pipelines); kohya sd-scripts,
ComfyUI and AUTOMATIC1111 are checked with their key conventions (tests/lora_conventions.py); kohya names of real
SD 1.5 and SDXL modules are checked against hand-written names. Old diffusers stacks and InvokeAI run in
``benchmarks/lora_clients.py`` (and the slow test at the end).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_conventions import (
    SD15_LAYOUT,
    SD15_UNET,
    SDXL_UNET,
    a1111_compvis_name,
    a1111_table,
    comfyui_table,
    kohya_deltas,
    layers,
    meta_unet,
    read,
    sd_scripts_table,
)
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_pipelines import generate, tiny_pipeline

from erase.cli import main
from erase.lora_format import kohya_stem, unet_layout
from erase.patch import load_patch, make_lora_patch, save_patch
from pipelines.apply import apply_patch, remove_patch

SDXL_LAYOUT = {"layers_per_block": 2, "up_blocks_with_attention": [0, 1]}

SD15_NAMES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "lora_unet_down_blocks_0_attentions_0_"
     "transformer_blocks_0_attn2_to_k"),
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0", "lora_unet_up_blocks_3_attentions_2_"
     "transformer_blocks_0_attn2_to_out_0"),
    ("unet", "mid_block.attentions.0.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("unet", "down_blocks.1.resnets.0.conv1", "lora_unet_down_blocks_1_resnets_0_conv1"),
    ("text_encoder", "text_model.encoder.layers.11.self_attn.q_proj", "lora_te_text_model_encoder_layers_11_self_"
     "attn_q_proj"),
    ("text_encoder", "encoder.layers.0.mlp.fc1", "lora_te_text_model_encoder_layers_0_mlp_fc1"),  # transformers 5
]  # fmt: skip
SDXL_NAMES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "lora_unet_input_blocks_4_1_"
     "transformer_blocks_1_attn2_to_k"),
    ("unet", "down_blocks.2.attentions.1.proj_in", "lora_unet_input_blocks_8_1_proj_in"),
    ("unet", "mid_block.attentions.0.transformer_blocks.9.attn2.to_v", "lora_unet_middle_block_1_transformer_"
     "blocks_9_attn2_to_v"),
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", "lora_unet_output_blocks_2_1_"
     "transformer_blocks_0_attn1_to_out_0"),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "lora_unet_output_blocks_3_1_"
     "transformer_blocks_0_ff_net_0_proj"),
    ("unet", "down_blocks.0.resnets.1.conv1", "lora_unet_input_blocks_2_0_in_layers_2"),
    ("unet", "down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("unet", "down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("unet", "up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
    ("unet", "up_blocks.2.resnets.2.time_emb_proj", "lora_unet_output_blocks_8_0_emb_layers_1"),
    ("unet", "mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
    ("unet", "time_embedding.linear_1", "lora_unet_time_embed_0"),
    ("unet", "add_embedding.linear_2", "lora_unet_label_emb_0_2"),
    ("unet", "conv_in", "lora_unet_input_blocks_0_0"),
    ("unet", "conv_out", "lora_unet_out_2"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj", "lora_te1_text_model_encoder_layers_0_self_"
     "attn_k_proj"),
    ("text_encoder_2", "text_model.encoder.layers.31.mlp.fc2", "lora_te2_text_model_encoder_layers_31_mlp_fc2"),
]  # fmt: skip


@pytest.mark.parametrize("component, module, expected", SD15_NAMES)
def test_kohya_names_of_sd15_modules(component, module, expected):
    assert kohya_stem(component, module, sdxl=False) == expected


@pytest.mark.parametrize("component, module, expected", SDXL_NAMES)
def test_kohya_names_of_sdxl_modules_are_the_sgm_names_kohya_trains_sdxl_with(component, module, expected):
    assert kohya_stem(component, module, sdxl=True, layout=SDXL_LAYOUT) == expected


def test_every_real_unet_module_gets_a_distinct_name_and_a1111_finds_the_sd15_ones():
    sd15, sdxl = meta_unet(SD15_UNET), meta_unet(SDXL_UNET)
    assert unet_layout(sd15.state_dict()) is None  # SD 1.5: diffusers names (kohya's SD 1.x convention)
    layout = unet_layout(sdxl.state_dict())
    assert layout == {"family": "sdxl", **SDXL_LAYOUT}
    for unet, kwargs in ((sd15, {}), (sdxl, {"layout": layout})):
        names = [kohya_stem("unet", m, sdxl=bool(kwargs), **kwargs) for m in layers(unet)]
        assert len(set(names)) == len(names) == len(layers(unet))
    # A1111: its SD 1.x regular expressions take every attention and resnet module of SD 1.5 to the CompVis module
    # that is the same layer
    table = a1111_table({"unet": sd15}, SD15_LAYOUT)
    checked = 0
    for module in layers(sd15):
        if ".attentions." in module or ".resnets." in module:
            found = table.get(a1111_compvis_name(kohya_stem("unet", module, sdxl=False)))
            assert found == ("unet", module), module
            checked += 1
    assert checked == 16 * 12 + 22 * 3 + 14  # 16 transformers x 12 layers; 22 resnets x 3, 14 conv shortcuts


def lora_for(pipe) -> tuple:
    """A LoRA with mixed ranks and alphas != rank on UNet self/cross attention, a resnet 3x3 conv and every text
    encoder's attention (q, k, v, out), plus the base state dicts."""
    g = torch.Generator().manual_seed(5)
    comps = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None)}
    base = {c: m.state_dict() for c, m in comps.items()}
    unet_modules = [
        n for n in layers(pipe.unet) if n.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_out.0", "attn1.to_q"))
    ]
    unet_modules.append(next(n for n in layers(pipe.unet) if n.endswith("resnets.0.conv1")))
    factors, alphas = {"unet": {}}, {}
    for i, module in enumerate(unet_modules):
        w = base["unet"][module + ".weight"]
        rank = 4 if i % 2 else 2
        down = 0.3 * torch.randn(rank, *w.shape[1:], generator=g)
        up = 0.3 * torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g)
        factors["unet"][module] = (down, up)
        alphas[f"unet.{module}"] = 8.0 if rank == 4 else 3.0
    for component in [c for c in comps if c != "unet"]:
        factors[component] = {}
        for module in [n for n in layers(comps[component]) if "layers.0.self_attn." in n]:
            w = base[component][module + ".weight"]
            factors[component][module] = (
                0.3 * torch.randn(3, w.shape[1], generator=g),
                0.3 * torch.randn(w.shape[0], 3, generator=g),
            )
            alphas[f"{component}.{module}"] = 1.5
    patch = make_lora_patch(base, factors, lora_alpha=alphas, method="test", concepts=["cat"])
    return patch, base


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_default_file_loads_in_diffusers_exactly_every_module_at_its_strength(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    patch, base = lora_for(pipe)
    path = save_patch(patch, tmp_path / "erase.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    te_prefix = "lora_te1_" if arch == "sdxl" else "lora_te_"
    assert any(k.startswith(te_prefix + "text_model_encoder_layers_0_self_attn_") for k in keys)
    assert (arch == "sdxl") == any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert float(meta["ss_network_alpha"]) > 0 and meta["ss_network_module"] == "networks.lora"

    handle = apply_patch(pipe, load_patch(path))
    ours = generate(pipe)
    remove_patch(handle)

    vanilla = tiny_pipeline(arch)
    vanilla.load_lora_weights(str(path))  # diffusers' own kohya converter, alphas from the .alpha tensors
    assert np.abs(generate(vanilla) - ours).max() <= 1e-5
    vanilla.fuse_lora()
    vanilla.unload_lora_weights()
    checked = 0
    for component in base:
        fused = getattr(vanilla, component).state_dict()
        deltas = patch.dense_deltas(component) if component in patch.targets else {}
        for name, before in base[component].items():
            if name in deltas:  # every module of the file is applied, at erase's strength
                expected = before + deltas[name]
                torch.testing.assert_close(fused[name], expected, atol=1e-5, rtol=1e-5)
                assert deltas[name].abs().max() > 1e-3
                checked += 1
            else:
                assert torch.equal(fused[name], before), name  # nothing else moves
    assert checked == sum(len(patch.target_names(c)) for c in patch.targets)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sd_scripts_and_comfyui_conventions_apply_every_module_exactly(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    patch, _ = lora_for(pipe)
    state = read(save_patch(patch, tmp_path / "erase.safetensors"))
    comps = {c: getattr(pipe, c) for c in patch.targets}
    padding = set(json.loads(safe_open(str(tmp_path / "erase.safetensors"), "pt").metadata()["erase.lora_padding"]))
    for table in (sd_scripts_table(comps, arch == "sdxl"), comfyui_table(comps, arch == "sdxl")):
        deltas, unmatched = kohya_deltas(state, table)
        assert unmatched == [] and not padding  # the patch has out_proj: no padding module
        for component in patch.targets:
            for name, expected in patch.dense_deltas(component).items():
                torch.testing.assert_close(deltas[(component, name[: -len(".weight")])], expected, atol=1e-6, rtol=0)
        half, _ = kohya_deltas(state, table, strength=0.5)
        assert all(torch.allclose(half[k], 0.5 * v) for k, v in deltas.items())
    # the PEFT layout (erase before format 2) is invisible to these conventions: why it was a silent no-op
    peft = read(save_patch(patch, tmp_path / "peft.safetensors", lora_layout="peft"))
    assert kohya_deltas(peft, comfyui_table(comps, arch == "sdxl"))[0] == {}
    assert kohya_deltas(peft, sd_scripts_table(comps, arch == "sdxl"))[0] == {}


def test_kohya_file_round_trips_through_erase_bitwise(tmp_path):
    pipe = tiny_pipeline("sd1")
    mixed, base = lora_for(pipe)
    # a trainer's LoRA has one alpha: stored and read back bit for bit
    uniform = make_lora_patch(base, {"unet": {m: _pair(mixed, m) for m in _unet_modules(mixed)}}, lora_alpha=8.0)
    loaded = load_patch(save_patch(uniform, tmp_path / "uniform.safetensors"))
    assert loaded.hash_check == "verified" and loaded.lora_config == uniform.lora_config
    assert all(torch.equal(loaded.tensors[k], t) for k, t in uniform.tensors.items())
    # mixed alphas: minority modules have their scale folded into lora_up (one alpha per file, see file_alpha);
    # the same weight change, and saving what was read gives the same file
    once = load_patch(save_patch(mixed, tmp_path / "mixed.safetensors"))
    assert len({c["lora_alpha"] for c in once.lora_config.values()}) == 1
    assert all(not c["alpha_pattern"] for c in once.lora_config.values())
    for component in mixed.targets:
        for name, expected in mixed.dense_deltas(component).items():
            torch.testing.assert_close(once.dense_delta(component, name), expected, atol=1e-6, rtol=1e-6)
    twice = load_patch(save_patch(once, tmp_path / "again.safetensors"))
    assert all(torch.equal(twice.tensors[k], t) for k, t in once.tensors.items())
    assert twice.lora_config == once.lora_config
    base_image = generate(pipe)
    handle = apply_patch(pipe, once)
    assert np.abs(generate(pipe) - base_image).max() > 1e-3
    remove_patch(handle)
    assert np.array_equal(generate(pipe), base_image)


def _unet_modules(patch) -> list[str]:
    return [n[: -len(".weight")] for n in patch.target_names("unet")]


def _pair(patch, module: str) -> tuple:
    return patch.tensors[f"unet.{module}.lora_A.weight"], patch.tensors[f"unet.{module}.lora_B.weight"]


def test_a_format_1_peft_patch_still_loads_and_applies_the_same(tmp_path, capsys):
    pipe = tiny_pipeline("sd1")
    patch, _ = lora_for(pipe)
    kohya = save_patch(patch, tmp_path / "new.safetensors")
    peft = save_patch(patch, tmp_path / "peft.safetensors", lora_layout="peft")
    with safe_open(str(peft), "pt") as f:  # what erase wrote before format 2: version 1, no layout key
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["erase.format_version"] = "1"
    del meta["erase.lora_layout"], meta["erase.sha256"]  # format 1 had no header digest
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    loaded = load_patch(old)
    assert loaded.format_version == 1 and loaded.lora_config == patch.lora_config
    assert all(torch.equal(loaded.tensors[k], t) for k, t in patch.tensors.items())
    handle = apply_patch(pipe, loaded)
    via_old = generate(pipe)
    remove_patch(handle)
    apply_patch(pipe, load_patch(kohya))
    assert np.abs(generate(pipe) - via_old).max() <= 1e-5
    assert main(["inspect", str(old)]) == 0
    assert "written by erase before format 2: re-export with 'erase export PATCH --to lora'" in capsys.readouterr().out
    upgraded = tmp_path / "upgraded.safetensors"
    assert main(["export", str(old), "--to", "lora", "--out", str(upgraded), "--trust-unverified"]) == 0
    with safe_open(str(upgraded), "pt") as f:
        assert set(f.keys()) == set(read(kohya))


def test_alpha_tensors_that_disagree_with_the_config_are_refused(tmp_path):
    pipe = tiny_pipeline("sd1")
    patch, _ = lora_for(pipe)
    path = save_patch(patch, tmp_path / "erase.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = tensors[key] * 2  # other clients would apply this module at twice erase's strength
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    with pytest.raises(ValueError, match="alpha tensors disagree with erase.lora_config"):
        load_patch(edited, verify=False)


def test_rank_auto_exports_a_uce_delta_exactly_within_its_own_rank(tmp_path, capsys):
    from erase.methods.uce import UCEConfig
    from erase.training.run import train_patch

    pipe = tiny_pipeline("sd1")
    patches = {
        kind: train_patch("uce", UCEConfig(model="tiny", concepts=["red"], kind=kind), pipe=pipe, progress=False)
        for kind in ("delta", "lora")
    }
    uce_rank = patches["lora"].notes["lora_rank"]
    delta = save_patch(patches["delta"], tmp_path / "uce.safetensors")
    exact = tmp_path / "exact.safetensors"
    assert main(["export", str(delta), "--to", "lora", "--rank", "auto", "--max-error", "0", "--out", str(exact)]) == 0
    assert "relative reconstruction error at rank auto" in capsys.readouterr().out
    lora = load_patch(exact)
    assert lora.notes["relative_error"] < 1e-5 and lora.notes["kept_energy_share"] > 1 - 1e-9
    ranks = {t.shape[0] for k, t in lora.tensors.items() if k.endswith("lora_A.weight")}
    assert max(ranks) <= uce_rank  # the numerical rank, never more
    for name, expected in patches["delta"].dense_deltas("unet").items():
        torch.testing.assert_close(lora.dense_delta("unet", name), expected, atol=5e-6, rtol=1e-5)
    # a rank below the edit's is refused by default, with the kept share named
    assert main(["export", str(delta), "--to", "lora", "--rank", "1", "--out", str(tmp_path / "r1.safetensors")]) == 2
    assert "of the edit's energy), above --max-error 0.01" in capsys.readouterr().err


def test_peft_export_has_one_rank_and_alpha_equal_to_it_for_old_diffusers(tmp_path):
    """diffusers < 0.34 ignores the header: a PEFT file is right there only if every module has scale 1 and one
    rank; the export pads ranks with zeros and folds scales, and the weight change stays erase's."""
    from erase.lora_export import lora_to_peft

    patch, _ = lora_for(tiny_pipeline("sd1"))  # ranks 2, 3 and 4, alphas 3, 8 and 1.5
    peft = load_patch(save_patch(lora_to_peft(patch), tmp_path / "peft.safetensors", lora_layout="peft"))
    ranks = {t.shape[0] for k, t in peft.tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {4} and all(
        c["r"] == c["lora_alpha"] == 4 and not c["rank_pattern"] for c in peft.lora_config.values()
    )
    for component in patch.targets:
        for name, expected in patch.dense_deltas(component).items():
            torch.testing.assert_close(peft.dense_delta(component, name), expected, atol=1e-6, rtol=1e-6)
