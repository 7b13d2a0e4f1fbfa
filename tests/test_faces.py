"""Face detection on real photos against facenet-pytorch's MTCNN, and the device-side crops against
the original's own operations (torchvision pad + resize: tests/face_torch_reference.py; skimage
similarity estimate + kornia 0.7.1 warp_affine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
from face_torch_reference import reference_face_chip, reference_square_box
from PIL import Image

from fairdiff_jax.judging import crops as crops_lib
from fairdiff_jax.judging import detection as detection_lib
from fairdiff_jax.judging import mtcnn

facenet_pytorch = pytest.importorskip("facenet_pytorch")
kornia = pytest.importorskip("kornia")


def _photo_512(name):
    """A photo shipped with scikit-image, as RGB uint8 resized to 512x512 (the generator's size)."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.asarray(Image.fromarray(image).resize((512, 512), Image.BILINEAR))


def _to_unit_range(uint8_images):
    return uint8_images.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def photos():
    """astronaut (Eileen Collins, frontal), coffee (no face), camera (cameraman, three-quarter view)."""
    return np.stack([_photo_512(n) for n in ("astronaut", "coffee", "camera")])


@pytest.fixture(scope="module")
def detector():
    return mtcnn.MTCNNDetector()


@pytest.fixture(scope="module")
def detections(detector, photos):
    return detector.detect(_to_unit_range(photos))


def _reference_largest_faces(uint8_images):
    """facenet-pytorch's detect_face (defaults: min face 20, thresholds 0.6/0.7/0.7, factor 0.709), then
    the face of largest area clipped to the image, per image: (boxes, landmarks) or None."""
    from facenet_pytorch.models.utils.detect_face import detect_face

    nets = [facenet_pytorch.PNet().eval(), facenet_pytorch.RNet().eval(), facenet_pytorch.ONet().eval()]
    with torch.no_grad():
        boxes, points = detect_face(uint8_images, 20, *nets, [0.6, 0.7, 0.7], 0.709, "cpu")
    height, width = uint8_images.shape[1:3]
    out = []
    for b, p in zip(boxes, points):
        if len(b) == 0:
            out.append(None)
            continue
        b = b.astype(np.float64)
        area = ((np.minimum(b[:, 2], width) - np.maximum(b[:, 0], 0))
                * (np.minimum(b[:, 3], height) - np.maximum(b[:, 1], 0)))
        best = int(np.argmax(area))
        out.append((b[best, :4], p[best].astype(np.float64), b[best, 4]))
    return out


def test_detector_agrees_with_facenet_pytorch_on_photos(photos, detections):
    reference = _reference_largest_faces(photos)
    np.testing.assert_array_equal(detections.found, [r is not None for r in reference])
    assert detections.found.tolist() == [True, False, True]
    for i, ref in enumerate(reference):
        if ref is None:
            continue
        box, landmarks, confidence = ref
        # Same algorithm and weights: agreement to well under a pixel (the task allows 3 px).
        np.testing.assert_allclose(detections.boxes[i], box, atol=0.5)
        np.testing.assert_allclose(detections.landmarks[i], landmarks, atol=0.5)
        np.testing.assert_allclose(detections.confidence[i], confidence, atol=1e-3)
    # Sanity of the geometry on the frontal face: eyes above the nose above the mouth, left/right kept.
    eye_l, eye_r, nose, mouth_l, mouth_r = detections.landmarks[0]
    assert eye_l[0] < nose[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])


def test_no_face_gives_fills(detections):
    assert not detections.found[1]
    np.testing.assert_array_equal(detections.boxes[1], -1)
    np.testing.assert_array_equal(detections.landmarks[1], -1)
    assert detections.confidence[1] == -1


def test_largest_faces_uses_area_clipped_to_the_image():
    # Image 0: a huge box mostly outside the image loses to a smaller box fully inside.
    boxes = np.array([[-300, -300, 60, 60], [10, 10, 90, 90], [5, 5, 20, 20]], np.float32)
    picked = detection_lib.largest_faces(np.array([0, 0, 2]), boxes, np.zeros((3, 5, 2)), np.array([0.9, 0.8, 0.99]),
                                 num_images=3, image_size=(100, 100))
    assert picked.found.tolist() == [True, False, True]
    np.testing.assert_array_equal(picked.boxes, [[10, 10, 90, 90], [-1, -1, -1, -1], [5, 5, 20, 20]])
    np.testing.assert_array_equal(picked.confidence, np.float32([0.8, -1, 0.99]))


# ------------------------------------------------------------------------------------------------
# Crops.




def test_square_boxes_match_the_original_expansion():
    boxes = np.array([[181.05, 62.16, 267.75, 172.05], [10.4, 20.2, 90.7, 45.1], [-30.0, 400.5, 100.0, 530.9],
                      [-1, -1, -1, -1]], np.float32)
    got = np.asarray(crops_lib.square_boxes(boxes, 0.5))
    want = [reference_square_box([float(v) for v in b], 0.5) for b in boxes[:3]]
    np.testing.assert_array_equal(got[:3], want)
    np.testing.assert_array_equal(got[3], -1)  # a "no face" row stays -1
    per_image = np.asarray(crops_lib.square_boxes(boxes[:2], np.array([0.5, 1.1])))
    np.testing.assert_array_equal(per_image[1], reference_square_box([float(v) for v in boxes[1]], 1.1))


def test_face_chips_match_original_crop_and_resize(photos, detections):
    images = _to_unit_range(photos)
    # The detected faces, a box reaching past the top-left corner (padding) and an upsampled small box.
    boxes = np.concatenate([np.asarray(crops_lib.square_boxes(detections.boxes, 0.5)),
                            [[-40, -25, 160, 175], [300, 310, 380, 390]]]).astype(np.float32)
    image_rows = np.array([0, 1, 2, 0, 2])
    found = np.array([True, False, True, True, True])
    chips = np.asarray(jax.jit(crops_lib.face_chips)(images[image_rows], boxes, found))
    assert chips.shape == (5, 224, 224, 3)
    np.testing.assert_array_equal(chips[1], -1.0)
    for k in (0, 2, 3, 4):
        want = reference_face_chip(torch.from_numpy(images[image_rows[k]]).permute(2, 0, 1), boxes[k], 224)
        # float32 source coordinates computed in a different order: ~1e-5 differences.
        np.testing.assert_allclose(chips[k], want.permute(1, 2, 0).numpy(), atol=1e-4)
    assert (chips[3, :20, :20] == -1).all() and (chips[3, 60:, 60:] > -1).any()


def _kornia_aligned(image_hwc, landmarks):
    """The original's image_pipeline: skimage similarity estimate onto the ArcFace template, kornia
    warp_affine of the 0..255 image (bilinear, zero padding, align_corners=False), back to [-1, 1]."""
    tform = skimage.transform.SimilarityTransform.from_estimate(landmarks, crops_lib.ARCFACE_TEMPLATE_112)
    matrix = torch.tensor(tform.params[:2], dtype=torch.float32)[None]
    image_255 = (torch.from_numpy(image_hwc).permute(2, 0, 1)[None] + 1) / 2 * 255
    warped = kornia.geometry.transform.warp_affine(image_255, matrix, (112, 112), mode="bilinear",
                                                   padding_mode="zeros", align_corners=False)
    return (warped[0] / 255 * 2 - 1).permute(1, 2, 0).numpy()


def test_aligned_faces_match_original_kornia_warp(photos, detections):
    images = _to_unit_range(photos)
    # Detected faces, plus landmarks near the corner so that part of the chip falls outside the image.
    landmarks = detections.landmarks.astype(np.float64).copy()
    landmarks[1] = crops_lib.ARCFACE_TEMPLATE_112 * 1.3 - 40
    found = np.array([True, True, True])
    chip_from_image = crops_lib.similarity_transforms(landmarks, found)
    aligned = np.asarray(jax.jit(crops_lib.aligned_faces)(images, chip_from_image, found))
    assert aligned.shape == (3, 112, 112, 3)
    for k in range(3):
        np.testing.assert_allclose(aligned[k], _kornia_aligned(images[k], landmarks[k]), atol=1e-4)
    assert (aligned[1, :5, :5] == -1).all()
    no_face = np.asarray(jax.jit(crops_lib.aligned_faces)(images, chip_from_image, np.array([True, False, True])))
    np.testing.assert_array_equal(no_face[1], -1.0)
    np.testing.assert_array_equal(no_face[0], aligned[0])


def test_similarity_transforms_recover_a_known_similarity():
    rng = np.random.default_rng(0)
    angle, scale, shift = np.array([0.3, -1.2]), np.array([0.4, 2.5]), rng.uniform(-50, 50, (2, 2))
    rotation = np.stack([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]).transpose(2, 0, 1)
    true_linear = scale[:, None, None] * rotation
    # landmarks = inverse map of the template, so the transform onto the template is the known one.
    landmarks = np.einsum("nde,nke->nkd", np.linalg.inv(true_linear), crops_lib.ARCFACE_TEMPLATE_112[None] - shift[:, None])
    got = crops_lib.similarity_transforms(landmarks).astype(np.float64)
    np.testing.assert_allclose(got[:, :, :2], true_linear, atol=1e-5)
    np.testing.assert_allclose(got[:, :, 2], shift, atol=1e-3)


def test_similarity_transforms_match_skimage_on_noisy_points():
    rng = np.random.default_rng(1)
    landmarks = crops_lib.ARCFACE_TEMPLATE_112 * 2.1 + 150 + rng.normal(0, 3, (4, 5, 2))
    landmarks[3] = landmarks[3][:, ::-1]  # x and y swapped (a reflection): the best proper rotation is still found
    got = crops_lib.similarity_transforms(landmarks)
    for k in range(4):
        want = skimage.transform.SimilarityTransform.from_estimate(landmarks[k], crops_lib.ARCFACE_TEMPLATE_112).params[:2]
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-4)
    not_found = crops_lib.similarity_transforms(np.full((2, 5, 2), -1.0), np.array([False, False]))
    np.testing.assert_array_equal(not_found, np.broadcast_to(np.eye(2, 3), (2, 2, 3)))


def test_gradients_reach_pixels_inside_the_box_only():
    images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    boxes = jnp.asarray([[20, 24, 40, 44], [0, 0, 10, 10]], jnp.float32)
    found = jnp.asarray([True, False])
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(2, 224, 224, 3)), jnp.float32)
    grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(crops_lib.face_chips(x, boxes, found) * weights)))(images))
    magnitude = np.abs(grad[0]).sum(-1)
    assert (magnitude[24:44, 20:40] > 0).all()
    outside = np.ones_like(magnitude, bool)
    outside[23:45, 19:41] = False
    assert (magnitude[outside] == 0).all()
    assert (grad[1] == 0).all()  # no face: no gradient

    chip_from_image = jnp.asarray(crops_lib.similarity_transforms(crops_lib.ARCFACE_TEMPLATE_112[None] * 0.25 + 10))
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(1, 112, 112, 3)), jnp.float32)
    loss = lambda x: jnp.sum(crops_lib.aligned_faces(x, chip_from_image, jnp.asarray([True])) * weights)
    grad = np.asarray(jax.jit(jax.grad(loss))(images[:1]))
    magnitude = np.abs(grad[0]).sum(-1)
    # The chip covers image x, y in about [10, 38]: gradient there, none far away.
    assert (magnitude[15:30, 15:30] > 0).all()
    assert (magnitude[45:] == 0).all() and (magnitude[:, 45:] == 0).all()
