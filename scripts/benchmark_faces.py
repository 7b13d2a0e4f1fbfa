"""Times face detection (MTCNN) and the device-side crops on a batch of 512x512 photos.

  .venv/bin/python -m scripts.benchmark_faces [--batch 8] [--repeats 3]

Prints ms per image: detection (host geometry + jitted networks), and face chips + aligned faces
(one jitted call), each after a warm-up call that compiles; with facenet-pytorch installed, also
its PyTorch MTCNN on the same images for comparison.
"""

import argparse
import time

import jax
import numpy as np
import skimage.data
from PIL import Image

from fairdiff_jax.judging import crops as crops_lib
from fairdiff_jax.judging import mtcnn

PHOTOS = ("astronaut", "camera", "coffee", "chelsea")


def photo_batch(batch: int) -> np.ndarray:
    """[batch, 512, 512, 3] uint8, the scikit-image photos repeated."""
    out = []
    for k in range(batch):
        image = getattr(skimage.data, PHOTOS[k % len(PHOTOS)])()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        out.append(np.asarray(Image.fromarray(image).resize((512, 512), Image.BILINEAR)))
    return np.stack(out)


def best_ms_per_image(fn, repeats: int, batch: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    uint8_images = photo_batch(args.batch)
    images = uint8_images.astype(np.float32) / 127.5 - 1.0
    detector = mtcnn.MTCNNDetector()
    detections = detector.detect(images)
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch} x 512x512; "
          f"faces found: {detections.found.sum()}")
    ms = best_ms_per_image(lambda: detector.detect(images), args.repeats, args.batch)
    print(f"detect:                 {ms:8.1f} ms/image")

    crop_boxes = crops_lib.square_boxes(detections.boxes, 0.5)
    chip_from_image = crops_lib.similarity_transforms(detections.landmarks, detections.found)
    device_images = jax.device_put(images)

    @jax.jit
    def crops(x):
        return (crops_lib.face_chips(x, crop_boxes, detections.found),
                crops_lib.aligned_faces(x, chip_from_image, detections.found))

    ms = best_ms_per_image(lambda: jax.block_until_ready(crops(device_images)), args.repeats, args.batch)
    print(f"face_chips + aligned:   {ms:8.1f} ms/image")

    try:
        import torch
        from facenet_pytorch import ONet, PNet, RNet
        from facenet_pytorch.models.utils.detect_face import detect_face
    except ImportError:
        return
    nets = [PNet().eval(), RNet().eval(), ONet().eval()]

    def reference():
        with torch.no_grad():
            detect_face(uint8_images, 20, *nets, [0.6, 0.7, 0.7], 0.709, "cpu")

    print(f"facenet-pytorch detect: {best_ms_per_image(reference, args.repeats, args.batch):8.1f} ms/image "
          f"(torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
