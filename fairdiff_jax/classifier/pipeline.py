"""The classifier trainer's input pipeline: a TFDS face-chip builder from the config, and tf.data streams.

Training batches: this process's share of the split (`tfds.split_for_jax_process`), files read in a
seeded order, the uint8 chips cached in memory, repeated, shuffled with a fixed seed and batched; so the
stream is a pure function of (config, step) and a resumed run skips the batches it has already trained on.
Chips stay uint8 until the jitted step (a quarter of the host memory and transfer); labels are int32.
"""

from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from ml_collections import config_dict

from fairdiff_jax.classifier import face_datasets

BUILDERS = {
    "miniature_faces": (face_datasets.MiniatureFaces, face_datasets.MiniatureFacesConfig),
    "labelled_face_folder": (face_datasets.LabelledFaceFolder, face_datasets.LabelledFaceFolderConfig),
}


def make_builder(data: config_dict.ConfigDict) -> tfds.core.DatasetBuilder:
    """The builder `data.builder` names, configured by `data.builder_config` (a dict of the config's fields)
    and prepared under `data.data_dir` (built on first use; labelled folders read `data.manual_dir`)."""
    if data.builder not in BUILDERS:
        raise ValueError(f"config.data.builder {data.builder!r} is not one of {', '.join(BUILDERS)}")
    builder_class, config_class = BUILDERS[data.builder]
    fields = dict(data.builder_config)
    known = {f.name for f in config_class.__dataclass_fields__.values()}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.data.builder_config has keys {unknown} that {config_class.__name__} does not know "
                         f"(it has: {', '.join(sorted(known))})")
    builder = builder_class(data_dir=data.data_dir, config=config_class(**fields))
    download_config = tfds.download.DownloadConfig(manual_dir=data.manual_dir) if data.get("manual_dir") else None
    builder.download_and_prepare(download_config=download_config)
    return builder


def _check_heads(builder: tfds.core.DatasetBuilder, heads: Sequence[tuple[str, int]]) -> None:
    features = builder.info.features
    for name, num_classes in heads:
        if name not in features or not isinstance(features[name], tfds.features.ClassLabel):
            raise ValueError(f"head {name!r}: the dataset {builder.info.full_name} has no label {name!r}")
        if features[name].num_classes != num_classes:
            raise ValueError(f"head {name!r} has {num_classes} classes, the dataset's label has "
                             f"{features[name].num_classes}")


def _inputs(heads: Sequence[tuple[str, int]]):
    def select(example):
        return {"face_chips": example["face_chip"], **{name: tf.cast(example[name], tf.int32) for name, _ in heads}}
    return select


def train_batches(builder: tfds.core.DatasetBuilder, split: str, heads: Sequence[tuple[str, int]],
                  batch_size_per_process: int, seed: int, shuffle_buffer: int, start_step: int = 0) -> Iterator[dict]:
    """Endless numpy batches {'face_chips': [B, S, S, 3] uint8, <head>: [B] int32}, from step `start_step` on."""
    _check_heads(builder, heads)
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=True,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.map(_inputs(heads), num_parallel_calls=tf.data.AUTOTUNE).cache().repeat()
    ds = ds.shuffle(shuffle_buffer, seed=seed).batch(batch_size_per_process, drop_remainder=True)
    return ds.skip(start_step).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def statistics_batches(builder: tfds.core.DatasetBuilder, split: str, num_chips_per_process: int,
                       batch_size_per_process: int, local_devices: int = 1) -> Iterator[np.ndarray]:
    """This process's first `num_chips_per_process` chips of `split` in stored order (no augmentation, no
    shuffle: a fixed sample, the same on every run), as uint8 batches [B, S, S, 3] of `batch_size_per_process`;
    the last may be smaller, cut to a multiple of `local_devices` (so it splits over the mesh). What the
    trainer recomputes the BatchNorm statistics from (fairdiff_jax/classifier/batch_norm.py)."""
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split)).take(num_chips_per_process)
    ds = ds.map(lambda example: example["face_chip"]).batch(batch_size_per_process)
    for chips in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        usable = len(chips) - len(chips) % local_devices
        if usable:
            yield chips[:usable]


def eval_batches(builder: tfds.core.DatasetBuilder, split: str, heads: Sequence[tuple[str, int]],
                 batch_size_per_process: int) -> Iterator[dict]:
    """One pass over this process's share of `split`, in batches of exactly `batch_size_per_process`: the
    last is padded with copies of its first row, and 'mask' ([B] bool) marks the real rows."""
    _check_heads(builder, heads)
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split)).map(_inputs(heads))
    for batch in ds.batch(batch_size_per_process).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        n = len(batch["face_chips"])
        pad = batch_size_per_process - n
        batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
        yield {**batch, "mask": np.arange(batch_size_per_process) < n}
