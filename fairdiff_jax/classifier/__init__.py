"""Training face-attribute classifiers in JAX: TFDS face-chip datasets (face_datasets), the input
pipeline (pipeline), the trainer (trainer, metrics) and the torchvision export; entry point
`python -m fairdiff_jax.train_classifier`."""

# triton, which torch._dynamo imports (diffusers loads it, for the miniature world's VAE), crashes the
# process with a segmentation fault when TensorFlow was loaded before it; this package loads TensorFlow
# (tensorflow-datasets), so torch._dynamo comes first.
import torch._dynamo  # noqa: F401
