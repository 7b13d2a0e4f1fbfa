"""The generic PyTorch -> Flax converter: layouts, names and every error it must name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fairdiff_jax.nn import weights


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.GroupNorm(2, 6)])
        self.proj = torch.nn.Linear(6, 3)
        self.register_buffer("position_ids", torch.arange(5))

    def forward(self, ids):  # ids: [B] -> [B, 3]
        x = self.embed(ids)[:, :, None, None].expand(-1, -1, 3, 3)
        x = self.blocks[1](self.blocks[0](x))
        return self.proj(x.mean(dim=(2, 3)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(5, 4, name="embed")(ids)
        x = jnp.broadcast_to(x[:, None, None, :], (ids.shape[0], 3, 3, 4))
        x = nn.Conv(6, (3, 3), padding=1, name="blocks_0")(x)
        x = nn.GroupNorm(num_groups=2, epsilon=1e-5, name="blocks_1")(x)
        return nn.Dense(3, name="proj")(x.mean(axis=(1, 2)))


def _torch_state():
    torch.manual_seed(0)
    net = TorchNet()
    return net, {k: v.detach().numpy() for k, v in net.state_dict().items()}


def _target():
    return jax.eval_shape(FlaxNet().init, jax.random.key(0), jnp.zeros((2,), jnp.int32))["params"]


def test_converted_params_reproduce_torch_outputs():
    net, state = _torch_state()
    params = weights.convert_state_dict(state, _target(), source="test", ignore=[r"position_ids"])
    ids = np.array([0, 3, 4])
    want = net(torch.from_numpy(ids)).detach().numpy()
    got = np.asarray(FlaxNet().apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_errors_name_the_keys():
    _, state = _torch_state()
    missing = {k: v for k, v in state.items() if k != "proj.bias"}
    with pytest.raises(weights.WeightLoadError, match=r"missing weights[\s\S]*proj/bias"):
        weights.convert_state_dict(missing, _target(), source="x.bin", ignore=[r"position_ids"])
    with pytest.raises(weights.WeightLoadError, match=r"unexpected weights[\s\S]*position_ids"):
        weights.convert_state_dict(state, _target(), source="x.bin")
    bad = dict(state, **{"proj.weight": np.zeros((4, 6), np.float32)})
    with pytest.raises(weights.WeightLoadError, match=r"x.bin[\s\S]*proj.weight: file \(6, 4\) vs model \(6, 3\)"):
        weights.convert_state_dict(bad, _target(), source="x.bin", ignore=[r"position_ids"])


def test_read_state_dict_and_find_file(tmp_path):
    net, state = _torch_state()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "net.pt")
    loaded = weights.read_state_dict(tmp_path / "net.pt")
    assert set(loaded) == set(state)
    np.testing.assert_array_equal(loaded["proj.weight"], state["proj.weight"])
    with pytest.raises(weights.WeightLoadError, match="weights file not found: .*nope.pt"):
        weights.read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(weights.WeightLoadError, match="no weights file in .*model.safetensors, model.bin"):
        weights.find_weights_file(tmp_path, ["model"])
    with pytest.raises(weights.WeightLoadError, match="model folder not found"):
        weights.find_weights_file(tmp_path / "absent", ["model"])
