"""SFNet-20 in Flax vs the PyTorch SFNet-20 of tests/face_torch_reference.py (opensphere's backbone).

The reference is built from the facts (layer widths, block counts, conv/bias/BN placement, ReLU
positions, channel-major flatten, DataParallel key prefix), not from the Flax code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from face_torch_reference import TorchSFNet20
from torch import nn

from fairdiff_jax.judging.sfnet import face_features, load_sfnet
from fairdiff_jax.nn import weights

RELATIVE_TOL = 2e-5  # max-abs difference allowed, relative to the largest reference value (float32)
GRADIENT_RELATIVE_L2 = 1e-2  # ||grad - torch grad|| / ||torch grad||


def _faces(n=2, seed=0):
    """Aligned-face stand-ins [n, 112, 112, 3] in [-1, 1], not left-right symmetric."""
    rng = np.random.default_rng(seed)
    coarse = np.repeat(np.repeat(rng.uniform(-1, 1, (n, 14, 14, 3)), 8, axis=1), 8, axis=2)
    return np.clip(0.8 * coarse + rng.uniform(-0.2, 0.2, coarse.shape), -1, 1).astype(np.float32)


def _torch_net(batch_norm, conv_name="conv1", seed=0, **shape):
    """Random weights scaled so that activations keep an O(1) scale through the 20 layers, BatchNorm
    statistics from a forward pass over random faces (as a trained net's), random affine terms."""
    torch.manual_seed(seed)
    net = TorchSFNet20(batch_norm, conv_name, **shape)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5 * (1.0 if batch_norm else 0.5))
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.05)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.momentum = 1.0  # the calibration pass below sets the running statistics
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
                module.bias.normal_(0.0, 0.1)
        if batch_norm:
            net.train()(torch.rand(4, 3, 112, 112) * 2 - 1)
    return net.eval()


def _save_data_parallel(net, path):
    """As the original saved it: the state dict of nn.DataParallel(net), keys prefixed `module.`."""
    torch.save(nn.DataParallel(net).state_dict(), path)
    return str(path)


def _torch_out(net, faces):
    with torch.no_grad():
        return net(torch.from_numpy(faces.transpose(0, 3, 1, 2))).numpy()


@pytest.mark.parametrize("batch_norm", [False, True], ids=["sfnet20_deprecated", "sfnet20"])
def test_features_match_torch(tmp_path, batch_norm):
    net = _torch_net(batch_norm)
    path = _save_data_parallel(net, tmp_path / "backbone_100000.pth")
    module, variables = load_sfnet(path)
    assert module.batch_norm == batch_norm
    assert ("batch_stats" in variables) == batch_norm
    faces = _faces()

    want = _torch_out(net, faces)
    got = np.asarray(jax.jit(module.apply)(variables, faces))
    assert got.shape == (2, 512) and got.dtype == np.float32
    assert 0.1 < np.abs(want).max() < 1000
    np.testing.assert_allclose(got, want, atol=RELATIVE_TOL * np.abs(want).max(), rtol=0)

    # The loss's feature: normalize(f(x) + f(flip_lr(x))), the original's get_face_feats in torch.
    feats_t = _torch_out(net, faces) + _torch_out(net, faces[:, :, ::-1].copy())
    want_feature = torch.nn.functional.normalize(torch.from_numpy(feats_t), dim=-1).numpy()
    got_feature = np.asarray(jax.jit(lambda x: face_features(module, variables, x))(faces))
    np.testing.assert_allclose(np.linalg.norm(got_feature, axis=-1), 1.0, atol=1e-6)
    assert np.abs(want_feature - want / np.linalg.norm(want, axis=-1, keepdims=True)).max() > 1e-3, (
        "test faces should not be flip-symmetric for the features"
    )
    np.testing.assert_allclose(got_feature, want_feature, atol=RELATIVE_TOL, rtol=0)


def test_narrow_net_loads_with_its_own_widths(tmp_path):
    """The miniature world's SFNet: same layout, 8x narrower stages and 128-d features."""
    net = _torch_net(False, widths=(8, 16, 32, 64), feature_dim=128)
    module, variables = load_sfnet(_save_data_parallel(net, tmp_path / "narrow.pth"))
    assert module.stage_channels == (8, 16, 32, 64) and module.feature_dim == 128
    faces = _faces()
    want = _torch_out(net, faces)
    got = np.asarray(jax.jit(module.apply)(variables, faces))
    assert got.shape == (2, 128)
    np.testing.assert_allclose(got, want, atol=RELATIVE_TOL * np.abs(want).max(), rtol=0)


def test_older_opensphere_naming_loads(tmp_path):
    """Older opensphere named the stage-entry conv `conv` (`layer1.0.conv.weight`)."""
    net = _torch_net(False, conv_name="conv", seed=1)
    module, variables = load_sfnet(_save_data_parallel(net, tmp_path / "old.pth"))
    faces = _faces(n=1, seed=1)
    want = _torch_out(net, faces)
    got = np.asarray(module.apply(variables, faces))
    np.testing.assert_allclose(got, want, atol=RELATIVE_TOL * np.abs(want).max(), rtol=0)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_input_gradient_of_feature_matches_torch(tmp_path):
    """The feature sits inside the face-realism loss: its input gradient must be PyTorch's, finite, non-zero."""
    net = _torch_net(False, seed=2)
    module, variables = load_sfnet(_save_data_parallel(net, tmp_path / "b.pth"))
    faces = _faces(n=2, seed=2)
    target = np.random.default_rng(3).normal(size=(2, 512)).astype(np.float32)

    loss = lambda x: jnp.sum(1.0 - jnp.sum(face_features(module, variables, x) * target, axis=-1))  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(loss))(faces))

    faces_t = torch.from_numpy(faces.transpose(0, 3, 1, 2)).requires_grad_(True)
    feats_t = torch.nn.functional.normalize(net(faces_t) + net(torch.flip(faces_t, [3])), dim=-1)
    (1.0 - (feats_t * torch.from_numpy(target)).sum(-1)).sum().backward()
    want = faces_t.grad.numpy().transpose(0, 2, 3, 1)

    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    # Compared as a whole, not element by element: a ReLU input within float32 rounding of 0 may
    # fall on different sides in XLA and PyTorch and change the gradient locally (measured with
    # this seed: 0.1% relative L2 from such flips; 1e-6 elsewhere). A wrong formula is O(1) off.
    assert np.linalg.norm(grad - want) / np.linalg.norm(want) < GRADIENT_RELATIVE_L2


def test_bad_checkpoints_are_named(tmp_path):
    state = nn.DataParallel(_torch_net(False)).state_dict()
    del state["module.layer3.2.conv2.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(weights.WeightLoadError, match=r"broken\.pth[\s\S]*params/layer3_2/conv2/bias"):
        load_sfnet(tmp_path / "broken.pth")

    torch.save({"module.something.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(weights.WeightLoadError, match=r"other\.pth.*fc\.weight"):
        load_sfnet(tmp_path / "other.pth")
