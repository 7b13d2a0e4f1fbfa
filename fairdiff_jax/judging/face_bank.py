"""The face feature bank: SFNet features of real faces, the fall-back target of the face-realism loss.

File format (the original's `face_feats.pkl`, written with `pickle.dump`): a 5-tuple
`(feats, genders, gender_logits, races, race_logits)`, `feats` a [M, 512] float tensor (torch in
the original, numpy accepted). A dict with the keys 'feats', 'genders', 'gender_logits', 'races',
'race_logits' is accepted too. Only `feats` is used: the loss takes the nearest bank face whatever
its attributes.

A pickle can name any function to call while it loads (a crafted file runs a shell command). The bank is read
by a restricted unpickler that resolves only the numpy array and torch tensor rebuilders and plain containers;
a torch tensor's storage bytes are read with `torch.load(weights_only=True)` on the CPU (torch's own pickling
would call the unrestricted `torch.load` on them). Anything else in the file is refused before it runs.
"""

import codecs
import collections
import functools
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn.layers import l2_normalize

FIELDS = ("feats", "genders", "gender_logits", "races", "race_logits")


class FaceBankError(ValueError):
    """The face-bank file is missing or does not hold what the loss needs; the message names it."""


def _storage_from_bytes(data: bytes) -> Any:
    """A torch storage pickled inside the bank, read with torch's weights-only loader onto the CPU."""
    import torch

    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _torch_global(name: str) -> Any:
    import torch._utils

    return {"_rebuild_tensor_v2": torch._utils._rebuild_tensor_v2, "_load_from_bytes": _storage_from_bytes}[name]


def _numpy_global(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


# (module, name) a face bank may use -> a function returning the object to use for it. numpy 2 renamed
# numpy.core to numpy._core: banks pickled under either version name one of them.
_ALLOWED = {
    **{(module, name): functools.partial(_numpy_global, module, name)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
    **{(module, "_frombuffer"): functools.partial(_numpy_global, module, "_frombuffer")  # pickle protocol 5
       for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("_codecs", "encode"): lambda: codecs.encode,  # protocol 2 pickles bytes as codecs.encode(text, 'latin1')
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _torch_global("_rebuild_tensor_v2"),
    ("torch.storage", "_load_from_bytes"): lambda: _torch_global("_load_from_bytes"),
}


class _BankUnpickler(pickle.Unpickler):
    """Resolves only the names in _ALLOWED; any other global (os.system, eval, ...) raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a face bank holds only arrays and tensors")
        return _ALLOWED[(module, name)]()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU when it was pickled
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def read_face_bank_feats(path: str | Path) -> np.ndarray:
    """The raw (unnormalised) bank features [M, D] float32 of a face-bank pickle."""
    path = Path(path)
    if not path.is_file():
        raise FaceBankError(f"face bank file not found: {path}")
    try:
        with open(path, "rb") as f:
            content = _BankUnpickler(f).load()
    except Exception as e:
        raise FaceBankError(f"cannot read face bank {path}: {e}") from e
    if isinstance(content, dict):
        if "feats" not in content:
            raise FaceBankError(f"face bank {path} has no key 'feats' (keys: {sorted(map(str, content))})")
        feats = content["feats"]
    elif isinstance(content, (tuple, list)):
        if len(content) != len(FIELDS):
            raise FaceBankError(
                f"face bank {path} holds a {type(content).__name__} of {len(content)} items; expected "
                f"{len(FIELDS)}: {', '.join(FIELDS)}"
            )
        feats = content[0]
    else:
        raise FaceBankError(f"face bank {path} holds a {type(content).__name__}; expected a tuple or dict of {FIELDS}")
    feats = _to_numpy(feats)
    if feats.ndim != 2 or feats.shape[0] == 0 or not np.issubdtype(feats.dtype, np.floating):
        raise FaceBankError(f"face bank {path}: 'feats' must be a non-empty [M, D] float array, got {feats.dtype} {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise FaceBankError(f"face bank {path}: 'feats' has non-finite values")
    return feats.astype(np.float32)


def load_face_bank(path: str | Path, sharding: Optional[jax.sharding.Sharding] = None) -> jax.Array:
    """L2-normalised bank features [M, D] float32 on device (default device, or `sharding`)."""
    return l2_normalize(jax.device_put(read_face_bank_feats(path), sharding))


def nearest_bank_features(bank_feats: jax.Array, query: jax.Array) -> jax.Array:
    """For each query, the bank feature with the largest dot product (no gradient flows through).

    Args:
      bank_feats: [M, D] float32, L2-normalised (`load_face_bank`).
      query: [N, D] face features (`sfnet.face_features`).

    Returns:
      [N, D] float32: rows of `bank_feats`, constant for differentiation.
    """
    bank_feats = jax.lax.stop_gradient(bank_feats)
    # Full float32 matmul: TF32 / bf16 passes on accelerators could change which neighbour wins.
    scores = jnp.dot(jax.lax.stop_gradient(query).astype(jnp.float32), bank_feats.T, precision=jax.lax.Precision.HIGHEST)
    return bank_feats[jnp.argmax(scores, axis=1)]
