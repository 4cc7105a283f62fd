"""FID Inception-v3 (bdm_jax.inception) and its converter against pytorch-fid's reference network.

The reference is pytorch-fid's FID Inception (torchvision Inception3 with pytorch-fid's FIDInceptionA/C/E
blocks), randomly initialised (no downloads), with random batch-norm statistics so every layer's
conversion matters. ~15 s on 2 CPU cores (one 299x299 forward of 2 images in each framework).
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

from bdm_jax import convert_inception as conv
from bdm_jax import inception as inc


def reference_fid_inception(seed: int = 0) -> torch.nn.Module:
    """pytorch-fid's fid_inception_v3() network without its weight download: random weights, random
    BN statistics, fc scaled up so the 1008-way softmax is not uniform."""
    torch.manual_seed(seed)
    m = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    m.Mixed_5b = FIDInceptionA(192, pool_features=32)
    m.Mixed_5c = FIDInceptionA(256, pool_features=64)
    m.Mixed_5d = FIDInceptionA(288, pool_features=64)
    m.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    m.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    m.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    m.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    m.Mixed_7b = FIDInceptionE_1(1280)
    m.Mixed_7c = FIDInceptionE_2(2048)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.3, 0.3, generator=g)
                mod.running_mean.uniform_(-0.3, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
        m.fc.weight.mul_(200.0)
        m.fc.bias.uniform_(-1.0, 1.0, generator=g)
    return m.eval()


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference():
    return reference_fid_inception()


def test_parity_with_pytorch_fid(reference):
    """uint8 64x64 images -> pytorch-fid preprocessing (bilinear to 299, [-1, 1]) -> network, both sides."""
    m = reference
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    imgs[1, 20:40] = 0  # some structure besides noise
    got = {}
    m.Mixed_6d.branch1x1.register_forward_hook(lambda mod, i, o: got.__setitem__("spatial", o))
    m.avgpool.register_forward_hook(lambda mod, i, o: got.__setitem__("pool", o))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    x = 2.0 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1.0
    with torch.no_grad():
        logits = m(x).numpy()
    pool = got["pool"].flatten(1).numpy()
    spatial = got["spatial"].permute(0, 2, 3, 1).numpy()
    probs = torch.softmax(torch.from_numpy(pool) @ m.fc.weight.detach().T, dim=-1).numpy()  # IS: no fc bias

    ext = inc.InceptionFeatures(conv.torch_to_flax(m.state_dict()), batch_size=2)
    out = ext.outputs(imgs)
    assert out["features"].shape == (2, 2048) and out["spatial"].shape == (2, 17, 17, 192)
    assert out["probs"].shape == (2, 1008) and out["logits"].shape == (2, 1008)
    # Measured on CPU float32: 2.0e-7 (pool), 4.1e-7 (spatial), 5.9e-7 (logits), 1.9e-5 (probs: a softmax
    # peaked by the x200 fc amplifies logit round-off).
    assert rel_err(out["features"], pool) < 1e-5
    assert rel_err(out["spatial"], spatial) < 1e-5
    assert rel_err(out["logits"], logits) < 1e-5
    assert rel_err(out["probs"], probs) < 1e-4
    assert probs.max() > 0.05  # the softmax is not uniform, so the comparison above means something
    # gray input = the same image repeated to RGB
    gray = imgs[..., :1]
    np.testing.assert_allclose(ext.outputs(gray)["features"], ext.outputs(np.repeat(gray, 3, -1))["features"],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [32, 512])
def test_resize_matches_torch_interpolate(size):
    import jax.numpy as jnp

    x = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inc.resize_bilinear(jnp.asarray(x))), ref, atol=1e-6)


def test_converter_rejects_other_state_dicts(reference):
    sd = reference.state_dict()
    imagenet = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    with pytest.raises(ValueError, match="1008 classes.*torchvision's ImageNet"):
        conv.torch_to_flax(imagenet)
    no_aux = {k: v for k, v in imagenet.items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match="AuxLogits"):
        conv.torch_to_flax(no_aux)
    with pytest.raises(ValueError, match="missing: \\['params/Mixed_7c/branch_pool/conv/kernel'\\]"):
        conv.torch_to_flax({k: v for k, v in sd.items() if k != "Mixed_7c.branch_pool.conv.weight"})
    bad = dict(sd)
    bad["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        conv.torch_to_flax(bad)


def test_weight_files_roundtrip_and_missing(reference, tmp_path, monkeypatch):
    variables = conv.torch_to_flax(reference.state_dict())
    pth = str(tmp_path / inc.FID_WEIGHTS_FILE)
    torch.save(reference.state_dict(), pth)
    npz = str(tmp_path / "fid.npz")
    assert conv.main(["--src", pth, "--dst", npz]) == 0
    loaded = conv.load_variables(npz)
    from_pth = conv.load_variables(pth)
    for tree in (loaded, from_pth):
        np.testing.assert_array_equal(tree["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"],
                                      variables["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"])
        np.testing.assert_array_equal(tree["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                      variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"])
    monkeypatch.delenv("BDM_INCEPTION_WEIGHTS", raising=False)
    for path in (None, str(tmp_path / "nope.pth")):
        with pytest.raises(inc.MissingWeightsError, match=f"download {inc.FID_WEIGHTS_FILE} from https://"):
            inc.load_fid_inception(path)
    monkeypatch.setenv("BDM_INCEPTION_WEIGHTS", npz)
    assert inc.load_fid_inception().source == npz
    # an .npz of something else is refused with a pointer to the converter
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(inc.MissingWeightsError, match="convert_inception"):
        conv.load_variables(str(tmp_path / "other.npz"))


def test_input_validation(reference):
    ext = inc.InceptionFeatures(conv.torch_to_flax(reference.state_dict()))
    with pytest.raises(ValueError, match="uint8 images .* got dtype float32"):
        ext.outputs(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="got shape \\(1, 32, 32, 4\\)"):
        ext.outputs(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="integer values in \\[300, 300\\]"):
        ext.outputs(np.full((1, 32, 32, 3), 300, np.int32))
    assert os.path.basename(inc.FID_WEIGHTS_URL) == inc.FID_WEIGHTS_FILE
