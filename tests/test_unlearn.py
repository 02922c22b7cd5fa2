"""SalUn and DoCo on tiny SD 1.x / 2.x / SDXL pipelines: runs on every architecture, masked weights never move, the
sparse patch's mask is the saliency mask, DoCo's warm-up and loss formulas, the delta exports to an equivalent LoRA,
and the command line with a JSON config. Resume, the NaN guard and the rest of the shared contract: test_salun.py and
test_doco.py (`method_contract.MethodContract`)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny_pipelines import ARCHITECTURES, generate, tiny_pipeline

from erase.cli import main
from erase.lora_export import delta_to_lora
from erase.methods import doco, salun
from erase.methods.doco import DoCoConfig
from erase.methods.salun import SalUnConfig
from erase.patch import MASK, load_patch, unpack_mask
from erase.training.checkpoint import list_checkpoints
from erase.training.data import retain_prompts, split_retain, with_anchors
from erase.training.run import make_context, train_patch
from pipelines.apply import apply_patch, remove_patch
from pipelines.denoise import Conditioning, PromptEncoder, unet_output
from prompts.training import concept_prompts

TINY = {"model": "tiny", "prompts": "shapes", "batch_size": 2, "sample_steps": 2, "lr": 1e-3}


def salun_config(**overrides) -> SalUnConfig:
    return SalUnConfig(
        **{**TINY, "concepts": ["red"], "steps": 3, "forget_images": 4, "retain_images": 4, **overrides}
    )


def doco_config(**overrides) -> DoCoConfig:
    settings = {**TINY, "concepts": ["red"], "steps": 4, "warm_up": 1, "anchor_images": 4, "retain_images": 4}
    return DoCoConfig(**{**settings, **overrides})


def _checkpoint_weights(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        prefix = "module.student."
        return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_salun_and_doco_on_every_architecture(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red striped circle")
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for method, config in (("salun", salun_config()), ("doco", doco_config(concepts=["red", "circle"]))):
        path = tmp_path / f"{method}.safetensors"
        train_patch(method, config, path, pipe=pipe, progress=False)
        assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())  # the base is untouched
        patch = load_patch(path)
        assert patch.method == method and patch.config["anchor"] and patch.notes["steps"] == config.steps
        names = patch.target_names("unet")
        if method == "doco":
            assert patch.kind == "delta" and names
            assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
            assert patch.config["anchor"] == ["blue", "triangle"]
        else:
            assert patch.kind == "sparse" and patch.config["anchor"] == ["blue"]
        handle = apply_patch(pipe, patch)
        assert not (generate(pipe, "a red striped circle") == before).all()
        remove_patch(handle)
        assert (generate(pipe, "a red striped circle") == before).all()


def test_salun_sparse_mask_is_the_saliency_mask_and_masked_weights_never_move(tmp_path):
    pipe = tiny_pipeline("sd1")
    ctx = make_context("salun", salun_config(), pipe=pipe, progress=False)  # defaults resolved, as train_patch does
    mask = salun.prepare(ctx).mask
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == total // 2  # the default ratio 0.5, exactly

    config = salun_config(steps=4, checkpoint_every=3)
    patch = train_patch("salun", config, tmp_path / "s.safetensors", pipe=pipe, checkpoint_dir=tmp_path / "ck")
    stored = {
        n: unpack_mask(patch.tensors[f"unet.{n}{MASK}"], patch.shapes[f"unet.{n}"])
        for n in mask
        if f"unet.{n}{MASK}" in patch.tensors
    }
    for name, m in mask.items():
        assert torch.equal(stored.get(name, torch.zeros_like(m)), m), name

    # the raw trained weights at step 3 (before the patch is built): unmasked entries bitwise equal to the base
    base = pipe.unet.state_dict()
    weights = _checkpoint_weights(list_checkpoints(tmp_path / "ck")[-1])
    moved = kept = 0
    for name, w in weights.items():
        assert torch.equal(w[~mask[name]], base[name][~mask[name]]), name
        moved += int((w[mask[name]] != base[name][mask[name]]).sum())
        kept += int(mask[name].sum())
    assert moved > 0.9 * kept
    # tensors with an empty mask are not trained at all
    assert set(weights) == {n for n, m in mask.items() if m.any()}


def test_salun_loss_terms_follow_the_paper(tmp_path):
    pipe = tiny_pipeline("sd1")
    encode = PromptEncoder(pipe)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    c, u = encode(["a red circle", "a red square"]), encode(["", ""])
    guided = salun.guided_prediction(pipe.unet, x, t, c, u, 7.5)
    with torch.no_grad():
        e_c, e_u = unet_output(pipe.unet, x, t, c), unet_output(pipe.unet, x, t, u)
    torch.testing.assert_close(guided, 8.5 * e_c - 7.5 * e_u, rtol=1e-5, atol=1e-5)
    assert isinstance(Conditioning.cat([c, u]), Conditioning)


def test_salun_trained_and_frozen_anchor_targets_differ_and_int8_storage(tmp_path):
    pipe = tiny_pipeline("sd1")
    frozen = train_patch("salun", salun_config(steps=4), pipe=pipe, progress=False)
    trained = train_patch("salun", salun_config(steps=4, anchor_target="trained"), pipe=pipe, progress=False)
    name = frozen.target_names("unet")[0]
    assert not torch.equal(frozen.dense_delta("unet", name), trained.dense_delta("unet", name))
    small = train_patch("salun", salun_config(dtype="int8", kind="sparse"), pipe=pipe, progress=False)
    assert small.notes["dtype"] == "int8"
    with pytest.raises(ValueError, match="kind must be sparse or delta"):
        salun_config(kind="lora")


def test_doco_losses_and_discriminator_shapes():
    d = doco.PatchDiscriminator(4, 8, doco.discriminator_layers(8, 8))
    x_t, x_a = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert d(x_t).shape == (3, 1, 3, 3)  # 8 -> 4 (one stride-2 layer) -> 3x3 patch logits
    assert doco.discriminator_layers(64, 64) == 4 and doco.discriminator_layers(128, 96) == 4
    assert doco.PatchDiscriminator(4, 8, 4)(torch.randn(2, 4, 64, 64)).shape == (2, 1, 3, 3)
    real, fake = d(x_a), d(x_t)
    expected_d = F.binary_cross_entropy(torch.sigmoid(real), torch.zeros_like(real)) + F.binary_cross_entropy(
        torch.sigmoid(fake), torch.ones_like(fake)
    )
    torch.testing.assert_close(doco.discriminator_loss(d, x_t, x_a), expected_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(doco.adversarial_loss(d, x_t), -F.logsigmoid(-d(x_t)).mean(), rtol=1e-5, atol=1e-6)


def test_doco_warm_up_trains_only_the_discriminator(tmp_path):
    pipe = tiny_pipeline("sd1")
    config = doco_config(steps=3, warm_up=2, checkpoint_every=2)
    patch = train_patch("doco", config, pipe=pipe, checkpoint_dir=tmp_path, progress=False)
    base = pipe.unet.state_dict()
    weights = _checkpoint_weights(list_checkpoints(tmp_path)[-1])
    assert weights and all(torch.equal(w, base[n]) for n, w in weights.items())  # step 2: the UNet has not moved
    with safe_open(str(list_checkpoints(tmp_path)[-1]), framework="pt") as f:
        assert any(k.startswith("module.discriminator.") for k in f.keys())
    assert patch.target_names("unet")  # step 3 moved it


def test_doco_trains_one_discriminator_per_concept_or_one_shared(tmp_path):
    pipe = tiny_pipeline("sd1")
    prefixes = {}
    for mode in ("per-concept", "shared"):
        config = doco_config(concepts=["red", "circle"], steps=3, checkpoint_every=2, discriminator=mode)
        train_patch("doco", config, pipe=pipe, checkpoint_dir=tmp_path / mode, progress=False)
        with safe_open(str(list_checkpoints(tmp_path / mode)[-1]), framework="pt") as f:
            prefixes[mode] = {k.split(".")[1] for k in f.keys() if k.startswith("module.discriminator")}
    assert prefixes == {"per-concept": {"discriminator", "discriminator_1"}, "shared": {"discriminator"}}
    # one concept trains per step, so the default step count grows with the concepts
    assert DoCoConfig(concepts=["red"]).steps * 3 == DoCoConfig(concepts=["red", "green", "blue"]).steps


def test_doco_surgery_rules_give_different_updates():
    pipe = tiny_pipeline("sd1")
    deltas = {}
    for rule in ("doco", "pcgrad", "sum"):
        patch = train_patch("doco", doco_config(surgery=rule, prior="both"), pipe=pipe, progress=False)
        deltas[rule] = patch.dense_deltas("unet")
    name = next(iter(deltas["doco"]))
    assert not torch.equal(deltas["doco"][name], deltas["pcgrad"][name])
    assert not torch.equal(deltas["pcgrad"][name], deltas["sum"][name])


def test_adversarial_search_learns_the_token_and_leaves_the_unet_alone():
    from erase.training.adversarial import AdversarialToken
    from erase.training.data import generate_latents

    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    token = AdversarialToken(pipe, "red", "sks")
    start = [v.detach().clone() for v in token.vectors]
    images = generate_latents(
        pipe, ["a red circle", "a red square"] * 2, seed=0, steps=2, guidance=5.0, progress=False
    )
    prompts = ["a sks circle", "a sks square"] * 2
    optimizer = torch.optim.Adam(token.parameters(), lr=1e-2)
    # the loss is measured before each step: the second call sees the same batch after one step of v
    first = token.search(pipe.unet, pipe.scheduler, images.latents, prompts, optimizer, 1, 4, torch.manual_seed(0))
    again = token.search(pipe.unet, pipe.scheduler, images.latents, prompts, optimizer, 1, 4, torch.manual_seed(0))
    assert again < first
    assert not torch.equal(token.vectors[0].detach(), start[0])
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(p.grad is None for p in pipe.unet.parameters())
    # the token's prompts now encode differently from the word's and from the token's own embedding
    word, adv = PromptEncoder(pipe)(["a red circle"]).hidden, token.encode(["a sks circle"]).hidden
    assert not torch.allclose(word, adv) and not torch.allclose(PromptEncoder(pipe)(["a sks circle"]).hidden, adv)


def test_adversarial_settings_are_checked():
    with pytest.raises(ValueError, match="adversarial_share must be in"):
        salun_config(adversarial_share=0)
    with pytest.raises(ValueError, match="adversarial_token must be one word"):
        doco_config(adversarial_token="two words")
    with pytest.raises(ValueError, match="adversarial_every must be at least 0"):
        salun_config(adversarial_every=-1)


def test_a_multi_token_adversarial_token_is_refused_before_any_work(tmp_path, capsys):
    for method in ("salun", "doco"):
        out = tmp_path / f"{method}.safetensors"
        argv = ["train", "--method", method, "--concept", "red", "--adversarial-token", "sks,x", "--out", str(out)]
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "pass a one-token --adversarial-token" in err and "Traceback" not in err and "images" not in err
        assert not out.exists()


def test_doco_delta_exports_to_an_equivalent_lora():
    pipe = tiny_pipeline("sd2")
    delta = train_patch("doco", doco_config(), pipe=pipe, progress=False)
    lora, error = delta_to_lora(delta, rank=64)  # full rank of every k/v matrix: exact
    assert lora.kind == "lora" and error < 1e-5
    for name, value in delta.dense_deltas("unet").items():
        torch.testing.assert_close(lora.dense_delta("unet", name), value, rtol=1e-4, atol=1e-6)
    direct = train_patch("doco", doco_config(kind="lora", rank=2), pipe=pipe, progress=False)
    assert direct.kind == "lora"


def test_cli_trains_both_methods_from_a_json_config(tmp_path, capsys):
    folder = tmp_path / "sd1"
    tiny_pipeline("sd1").save_pretrained(folder)
    for method, settings in (
        ("salun", {"forget_images": 2, "retain_images": 2, "mask_ratio": 0.25}),
        ("doco", {"anchor_images": 2, "retain_images": 2, "warm_up": 1, "surgery": "pcgrad"}),
    ):
        config = tmp_path / f"{method}.json"
        config.write_text(json.dumps({**settings, "batch_size": 2, "sample_steps": 2, "prompts": "shapes"}))
        out = tmp_path / f"{method}.safetensors"
        argv = ["train", "--method", method, "--model", str(folder), "--concept", "red", "--config", str(config)]
        assert main([*argv, "--steps", "2", "--lr", "0.001", "--out", str(out), "--quiet"]) == 0
        patch = load_patch(out)
        assert patch.method == method and patch.config["steps"] == 2 and patch.config["batch_size"] == 2
        assert all(patch.config[k] == v for k, v in settings.items())
    assert "wrote" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--method",
                "salun",
                "--model",
                str(folder),
                "--concept",
                "red",
                "--mask-ratio",
                "2",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    assert "mask_ratio must be in (0, 1]" in capsys.readouterr().err


def test_anchor_mixes_and_balanced_retain_prompts():
    red = concept_prompts("red", "shapes")
    prompts = ["a red circle", "a red square", "a red cross"]
    assert with_anchors(red, prompts, "blue|green") == ["a blue circle", "a green square", "a blue cross"]
    assert with_anchors(red, prompts[:1], "purple") == ["a purple circle"]
    with pytest.raises(ValueError, match="empty alternative"):
        with_anchors(red, prompts, "blue|")
    near, far = split_retain([red])
    assert near and far and not any("red" in p for p in near + far)
    assert all(any(c in p for c in ("orange", "yellow", "green", "blue", "purple")) for p in near)
    assert not any(c in p for p in far for c in ("orange", "yellow", "green", "blue", "purple"))
    chosen = retain_prompts([red], 16, 0.25, "test")
    assert len(chosen) == 16 and sum(p in far for p in chosen) == 4
    assert retain_prompts([red], 16, 0.25, "test") == chosen  # a fixed choice
    pipe = tiny_pipeline("sd1")
    patch = train_patch("doco", doco_config(anchor=["blue|green"], steps=2), pipe=pipe, progress=False)
    assert patch.config["anchor"] == ["blue|green"]


def test_doco_two_processes_with_two_concepts_train_the_same_discriminator(tmp_path):
    """Each process must step the same per-concept discriminator (DDP): a per-process concept draw would hang."""
    import os
    import subprocess
    import sys

    out = tmp_path / "doco.safetensors"
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
        *(
            "--dynamo_backend",
            "no",
            "-m",
            "erase",
            "train",
            "--method",
            "doco",
            "--concept",
            "red",
            "--concept",
            "blue",
        ),
        *("--steps", "6", "--warm-up", "1", "--anchor-images", "4", "--retain-images", "4", "--batch-size", "2"),
        *("--sample-steps", "2", "--adversarial-every", "2", "--adversarial-steps", "2", "--out", str(out), "--quiet"),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    patch = load_patch(out)
    assert patch.notes["processes"] == 2 and patch.config["discriminator"] == "per-concept"
