"""Generator adapters (`pipelines.gan`): plain modules and callables, state dict + class path, NVlabs pickles (refused
without the flag, loaded through their own support modules), the Shapes GAN, and patches on generators."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_gan import TinyGenerator

import pipelines
from erase.patch import make_delta_patch
from pipelines.apply import apply_patch, remove_patch
from pipelines.gan import from_module, from_state_dict, load_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_plain_module_declares_its_pixel_range_and_trains():
    torch.manual_seed(0)
    generator = from_module(TinyGenerator(), pixel_range=(0.0, 1.0))
    z = generator.sample_latents(4, seed=3)
    assert torch.equal(z, generator.sample_latents(4, seed=3)) and z.shape == (4, 8)
    images = generator.sample(4, seed=3)
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 3)
    expected = (generator(z).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(images, expected)  # [0, 1] maps onto 0..255, not (x + 1) / 2
    generator(z).sum().backward()
    assert all(p.grad is not None for p in generator.module.parameters())
    groups = generator.layer_groups()
    assert list(groups) == ["fc", "up"] and sorted(generator.parameters_of(["up"])) == ["up.bias", "up.weight"]
    assert not generator.has_mapping
    with pytest.raises(ValueError, match="no mapping/synthesis split"):
        generator.to_w(z)
    with pytest.raises(ValueError, match="no layer group b4"):
        generator.parameters_of(["b4"])


def test_a_callable_samples_but_has_no_weights():
    generator = from_module(lambda z: torch.tanh(z[:, :3, None, None].expand(-1, 3, 4, 4)), z_dim=5)
    assert generator.sample(2, seed=0).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="plain callable"):
        generator.parameters_of()
    with pytest.raises(ValueError, match="pass z_dim"):
        from_module(lambda z: z)


def test_state_dict_and_class_path(tmp_path):
    torch.manual_seed(1)
    module = TinyGenerator(z_dim=6, channels=5)
    path = tmp_path / "tiny.safetensors"
    save_file(module.state_dict(), str(path))
    generator = load_generator(str(path), class_path="tiny_gan:TinyGenerator", kwargs='{"z_dim": 6, "channels": 5}')
    z = generator.sample_latents(3)
    assert torch.equal(generator(z), module(z)) and generator.z_dim == 6
    assert from_state_dict(path, "tiny_gan.TinyGenerator", {"z_dim": 6, "channels": 5}).z_dim == 6
    with pytest.raises(ValueError, match=r"mis-shaped keys .*fc\.weight"):
        from_state_dict(path, "tiny_gan:TinyGenerator", {"z_dim": 6, "channels": 4})
    with pytest.raises(ImportError, match="cannot import 'no_such_package'"):
        from_state_dict(path, "no_such_package:G")
    with pytest.raises(ValueError, match="is not an nn.Module class"):
        from_state_dict(path, "json:dumps")
    with pytest.raises(ValueError, match="without its class"):
        load_generator(str(path))


def test_pickles_are_refused_without_the_flag(tmp_path):
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(b"not even read")
    with pytest.raises(ValueError, match="loading it runs code: pass trust_remote_code=True / --trust-remote-code"):
        load_generator(str(path))
    assert path.read_bytes() == b"not even read"


_FAKE_STYLEGAN = """
import torch
from torch import nn


class Mapping(nn.Module):
    def __init__(self, z_dim, w_dim, num_ws):
        super().__init__()
        self.fc = nn.Linear(z_dim, w_dim)
        self.num_ws = num_ws

    def forward(self, z, c, truncation_psi=1):
        return (truncation_psi * self.fc(z))[:, None].repeat(1, self.num_ws, 1)


class Synthesis(nn.Module):
    def __init__(self, w_dim):
        super().__init__()
        self.b4 = nn.Linear(w_dim, 3 * 16)
        self.b8 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, ws, noise_mode="random"):
        assert noise_mode == "const"
        x = self.b4(ws[:, 0]).view(len(ws), 3, 4, 4)
        return torch.tanh(self.b8(nn.functional.interpolate(x, scale_factor=2)) + ws[:, 1, :1, None, None])


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = 6, 0, 5
        self.mapping = Mapping(6, 5, 2)
        self.synthesis = Synthesis(5)
"""

_CHECK = """
import sys
import pytest, torch
sys.path.insert(0, {tests!r})
from pipelines.gan import load_generator
before = list(sys.path)
with pytest.raises(ImportError, match="needs their modules dnnlib, torch_utils"):
    load_generator({pkl!r}, trust_remote_code=True)
generator = load_generator({pkl!r}, trust_remote_code=True, nvlabs_path={repo!r})
assert sys.path == before  # the NVlabs folder was on sys.path only while unpickling
z = generator.sample_latents(2)
ws = generator.to_w(z)
assert ws.shape == (2, 2, 5) and torch.equal(generator(z), generator.synthesis(ws))
assert list(generator.layer_groups()) == ["b4", "b8", "mapping"], generator.layer_groups()
assert generator.sample(2).shape == (2, 8, 8, 3)
print("ok")
"""


def test_an_nvlabs_pickle_loads_through_its_own_support_modules(tmp_path):
    repo = tmp_path / "stylegan3"
    (repo / "dnnlib").mkdir(parents=True)
    (repo / "torch_utils").mkdir()
    (repo / "dnnlib" / "__init__.py").write_text("")
    (repo / "torch_utils" / "__init__.py").write_text("")
    (repo / "torch_utils" / "fake_stylegan.py").write_text(_FAKE_STYLEGAN)
    pkl = tmp_path / "network-snapshot.pkl"
    make = (
        f"import pickle, sys, torch; sys.path.insert(0, {str(repo)!r}); torch.manual_seed(0);"
        "from torch_utils.fake_stylegan import Generator;"
        f"pickle.dump({{'G_ema': Generator()}}, open({str(pkl)!r}, 'wb'))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", make], check=True, env=env, cwd=tmp_path)
    script = textwrap.dedent(_CHECK).format(tests=os.path.join(ROOT, "tests"), pkl=str(pkl), repo=str(repo))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_shapes_gan_adapter_splits_mapping_and_synthesis():
    generator = pipelines.load_generator("shapes")
    assert generator.has_mapping and generator.pixel_range == (-1.0, 1.0) and generator.name == "shapes"
    z = generator.sample_latents(3)
    with torch.no_grad():
        assert torch.equal(generator(z), generator.synthesis(generator.to_w(z)))
    groups = generator.layer_groups()
    assert list(groups)[:2] == ["input", "b8"] and list(groups)[-1] == "mapping"
    names = {n for n, _ in generator.module.named_parameters()}
    assert sorted(n for g in groups.values() for n in g) == sorted(names)


def test_a_delta_patch_on_the_generator_applies_and_removes_exactly():
    generator = pipelines.load_generator("shapes")
    module = generator.module
    z = generator.sample_latents(4)
    with torch.no_grad():
        before = generator(z)
    base = {k: v.clone() for k, v in module.state_dict().items()}
    tuned = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in generator.parameters_of(["b16", "b32"]).items()}
    patch = make_delta_patch({"generator": base}, {"generator": tuned}, method="test")
    handle = apply_patch(module, patch)
    with torch.no_grad():
        patched = generator(z)
    assert not torch.equal(patched, before)
    assert all(torch.equal(module.state_dict()[n], tuned[n]) for n in tuned)
    remove_patch(handle)
    with torch.no_grad():
        assert torch.equal(generator(z), before)
    assert all(torch.equal(v, base[k]) for k, v in module.state_dict().items())
