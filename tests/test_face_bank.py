"""Face bank: reading the original's pickle, normalisation, nearest neighbour, errors."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fairdiff_jax.judging.face_bank import (
    FaceBankError,
    load_face_bank,
    nearest_bank_features,
)


def _bank_arrays(m=50, d=512, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(m, d)).astype(np.float32) * rng.uniform(0.5, 3.0, (m, 1)).astype(np.float32)
    genders = rng.integers(0, 2, m)
    races = rng.integers(0, 4, m)
    return feats, genders, rng.normal(size=(m, 2)), races, rng.normal(size=(m, 4))


def _write(path, content):
    with open(path, "wb") as f:
        pickle.dump(content, f)
    return path


def test_original_tuple_of_torch_tensors_is_normalised(tmp_path):
    """The original pickles a 5-tuple (feats, genders, gender logits, races, race logits) of torch tensors."""
    arrays = _bank_arrays()
    path = _write(tmp_path / "face_feats.pkl", tuple(torch.from_numpy(np.asarray(a)) for a in arrays))
    bank = load_face_bank(path)
    assert isinstance(bank, jax.Array) and bank.shape == (50, 512) and bank.dtype == jnp.float32
    want = arrays[0] / np.linalg.norm(arrays[0], axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(bank), want, atol=1e-6, rtol=0)


def test_dict_form_loads_the_same(tmp_path):
    arrays = _bank_arrays(seed=1)
    as_tuple = load_face_bank(_write(tmp_path / "t.pkl", arrays))
    as_dict = load_face_bank(
        _write(tmp_path / "d.pkl", dict(zip(("feats", "genders", "gender_logits", "races", "race_logits"), arrays)))
    )
    np.testing.assert_array_equal(np.asarray(as_tuple), np.asarray(as_dict))


def test_nearest_equals_numpy_argmax_and_has_no_gradient(tmp_path):
    bank = load_face_bank(_write(tmp_path / "b.pkl", _bank_arrays(m=300, seed=2)))
    rng = np.random.default_rng(3)
    query = rng.normal(size=(16, 512)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    bank_np = np.asarray(bank).astype(np.float64)
    # Half the queries sit next to a bank row, so that the right answer is unambiguous and known.
    planted = rng.choice(300, 8, replace=False)
    query[:8] = bank_np[planted] + 0.01 * query[:8]

    got = np.asarray(jax.jit(nearest_bank_features)(bank, jnp.asarray(query)))
    want_idx = np.argmax(query.astype(np.float64) @ bank_np.T, axis=1)
    np.testing.assert_array_equal(want_idx[:8], planted)
    np.testing.assert_array_equal(got, np.asarray(bank)[want_idx])

    grad = jax.grad(lambda q: jnp.sum(nearest_bank_features(bank, q)))(jnp.asarray(query))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"genders": np.zeros(3)}, r"bank\.pkl has no key 'feats'"),
        ((np.zeros((3, 512)), np.zeros(3)), r"bank\.pkl holds a tuple of 2 items; expected 5"),
        ((np.zeros(512), 0, 0, 0, 0), r"bank\.pkl: 'feats' must be a non-empty \[M, D\] float array"),
        ("not a bank", r"bank\.pkl holds a str"),
    ],
)
def test_bad_pickles_are_named(tmp_path, content, message):
    with pytest.raises(FaceBankError, match=message):
        load_face_bank(_write(tmp_path / "bank.pkl", content))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FaceBankError, match=r"not found: .*nowhere\.pkl"):
        load_face_bank(tmp_path / "nowhere.pkl")


class _RunsACommand:
    """What a crafted pickle does: name a function (here os.system) to call while loading."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("wrap", [lambda evil, arrays: evil, lambda evil, arrays: (evil,) + tuple(arrays[1:]),
                                  lambda evil, arrays: {"feats": arrays[0], "extra": evil}])
def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pkl", wrap(_RunsACommand(marker), _bank_arrays()))
    with pytest.raises(FaceBankError, match=r"evil.pkl.*refused to load posix.system"):
        load_face_bank(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_numpy_and_torch_banks_of_every_protocol_still_load(tmp_path, protocol):
    arrays = _bank_arrays(m=7, d=16, seed=4)
    want = arrays[0] / np.linalg.norm(arrays[0], axis=1, keepdims=True)
    for name, content in (("np", arrays), ("torch", tuple(torch.from_numpy(np.asarray(a)) for a in arrays))):
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump(content, f, protocol=protocol)
        np.testing.assert_allclose(np.asarray(load_face_bank(tmp_path / f"{name}.pkl")), want, atol=1e-6, rtol=0)
