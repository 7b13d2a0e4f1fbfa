"""MTCNN's networks and weight loader against facenet-pytorch's PyTorch MTCNN (same trained weights),
and the pipeline's building blocks (pooling, area resampling, NMS) against PyTorch / torchvision."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from fairdiff_jax.judging import mtcnn as mtcnn_pipeline
from fairdiff_jax.judging import mtcnn_nets
from fairdiff_jax.nn.weights import WeightLoadError

facenet_pytorch = pytest.importorskip("facenet_pytorch")


@pytest.fixture(scope="module")
def params():
    return mtcnn_nets.load_mtcnn_params()


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("height,width", [(12, 12), (31, 47), (64, 57)])
def test_pnet_matches_facenet_pytorch(params, height, width):
    x = np.random.default_rng(height).uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        want_offsets, want_probs = facenet_pytorch.PNet().eval()(_nchw(x))
    offsets, prob = mtcnn_nets.PNet().apply({"params": params["pnet"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(offsets), want_offsets.numpy().transpose(0, 2, 3, 1), atol=2e-5)
    np.testing.assert_allclose(np.asarray(prob), want_probs[:, 1].numpy(), atol=2e-6)


def test_rnet_matches_facenet_pytorch(params):
    x = np.random.default_rng(1).uniform(-1, 1, (7, 24, 24, 3)).astype(np.float32)
    with torch.no_grad():
        want_offsets, want_probs = facenet_pytorch.RNet().eval()(_nchw(x))
    offsets, prob = mtcnn_nets.RNet().apply({"params": params["rnet"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(offsets), want_offsets.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(prob), want_probs[:, 1].numpy(), atol=2e-6)


def test_onet_matches_facenet_pytorch(params):
    x = np.random.default_rng(2).uniform(-1, 1, (7, 48, 48, 3)).astype(np.float32)
    with torch.no_grad():
        want_offsets, want_points, want_probs = facenet_pytorch.ONet().eval()(_nchw(x))
    offsets, points, prob = mtcnn_nets.ONet().apply({"params": params["onet"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(offsets), want_offsets.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(points), want_points.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(prob), want_probs[:, 1].numpy(), atol=2e-6)


def test_loaded_weights_equal_facenet_pytorch_state_dicts(params):
    """The `mtcnn` package's lz4 weights are the same numbers as facenet-pytorch's .pt files."""
    data = Path(facenet_pytorch.__file__).parent / "data"
    state = torch.load(data / "onet.pt")
    conv1 = state["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(params["onet"]["conv1"]["kernel"], conv1)
    np.testing.assert_array_equal(params["onet"]["fc5"]["kernel"], state["dense5.weight"].numpy().T)
    np.testing.assert_array_equal(params["onet"]["prelu5"]["alpha"], state["prelu5.weight"].numpy())


def _write_list(path, arrays):
    import joblib

    joblib.dump(arrays, path, compress="lz4")


def test_loader_names_file_and_layer_of_a_bad_array(tmp_path, params):
    flat = [params["rnet"][layer][leaf] for layer, leaf in mtcnn_nets.weight_names("rnet")]
    flat[6] = flat[6][:1]  # conv3/kernel with a wrong shape
    _write_list(tmp_path / "rnet.lz4", flat)
    with pytest.raises(WeightLoadError, match=r"rnet\.lz4: array 6 \(conv3/kernel\) has shape \(1, 2, 48, 64\)"):
        mtcnn_nets.load_network_params("rnet", tmp_path / "rnet.lz4")
    _write_list(tmp_path / "rnet.lz4", flat[:-1])
    with pytest.raises(WeightLoadError, match=r"rnet\.lz4: expected a list of 16 arrays for rnet, found 15"):
        mtcnn_nets.load_network_params("rnet", tmp_path / "rnet.lz4")
    (tmp_path / "bad.lz4").write_bytes(b"not a joblib file")
    with pytest.raises(WeightLoadError, match=r"cannot read MTCNN weights file .*bad\.lz4"):
        mtcnn_nets.load_network_params("rnet", tmp_path / "bad.lz4")
    with pytest.raises(WeightLoadError, match=r"MTCNN weights file not found: .*pnet\.lz4"):
        mtcnn_nets.load_mtcnn_params(tmp_path)


@pytest.mark.parametrize("size,window,stride", [(23, 2, 2), (22, 3, 2), (9, 3, 2), (46, 3, 2), (8, 2, 2)])
def test_max_pool_ceil_matches_torch_ceil_mode(size, window, stride):
    x = np.random.default_rng(size).normal(size=(1, size, size + 1, 4)).astype(np.float32)
    want = torch.nn.functional.max_pool2d(_nchw(x), window, stride, ceil_mode=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(mtcnn_nets.max_pool_ceil(jnp.asarray(x), window, stride)), want)


@pytest.mark.parametrize("in_size,out_size", [(512, 308), (512, 14), (37, 24), (13, 48)])
def test_area_resize_matrix_matches_torch_area_interpolation(in_size, out_size):
    x = np.random.default_rng(0).uniform(0, 255, (1, 1, in_size, 5)).astype(np.float64)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(out_size, 5), mode="area").numpy()[0, 0]
    np.testing.assert_allclose(mtcnn_pipeline.area_resize_matrix(in_size, out_size) @ x[0, 0], want, atol=1e-9)


def _random_boxes(rng, count):
    corner = rng.uniform(0, 80, (count, 2))
    return np.concatenate([corner, corner + rng.uniform(5, 40, (count, 2))], axis=1)


def test_nms_matches_torchvision_batched_nms():
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 300)
    scores = rng.uniform(size=300)
    groups = rng.integers(0, 3, 300)
    want = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.5)
    np.testing.assert_array_equal(mtcnn_pipeline.nms(boxes, scores, groups, 0.5), want.numpy())


def test_nms_min_inclusive_matches_facenet_pytorch():
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy

    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 200)
    scores = rng.uniform(size=200)
    groups = rng.integers(0, 2, 200)
    want = batched_nms_numpy(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.7, "Min")
    got = mtcnn_pipeline.nms(boxes, scores, groups, 0.7, overlap="min", inclusive=True)
    np.testing.assert_array_equal(got, want.numpy())


def test_pyramid_scales_follow_min_face_size_and_factor():
    scales = mtcnn_pipeline.pyramid_scales(512, 600, 20, 0.709)
    # Largest: a 20-pixel face fills P-Net's 12-pixel window; smallest: the image's short side still >= 12 px.
    assert scales[0] == pytest.approx(0.6)
    np.testing.assert_allclose(np.diff(np.log(scales)), np.log(0.709))
    assert 512 * scales[-1] >= 12 > 512 * scales[-1] * 0.709
