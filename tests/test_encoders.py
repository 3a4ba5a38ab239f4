"""Encoders (`w2s_ray.encoders`): the hashed bag of words, and a Hugging Face model built here,
randomly initialised (no download), saved and loaded as a user's local model would be."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from w2s_ray import encoders
from w2s_ray.config import EncoderConfig
from w2s_ray.errors import ConfigError

TEXTS = ["The cat sat on the mat", "the CAT sat", "", "a dog barked at the cat", "on the mat the cat sat"]


def hashed(**kw) -> encoders.HashedBagOfWords:
    return encoders.build(EncoderConfig(kind="hashed", **kw))


def test_hashed_rows_do_not_depend_on_their_batch_and_are_unit_length():
    enc = hashed(dim=64, ngrams=2)
    x = enc.encode(TEXTS)
    assert x.shape == (5, 64) and x.dtype == np.float32
    one_by_one = np.concatenate([hashed(dim=64, ngrams=2).encode([t]) for t in TEXTS])
    assert np.array_equal(x, one_by_one)
    assert np.array_equal(x[::-1], enc.encode(TEXTS[::-1]))
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 4]], 1.0, rtol=1e-6)
    assert norms[2] == 0  # no words: a zero row, not NaN


def test_hashed_is_a_signed_log_count_of_the_grams():
    """Recomputed from the definition: each gram adds its sign to its bucket; counts are log-scaled."""
    enc = hashed(dim=32, ngrams=2, normalize=False)
    text = "to be or not to be"
    assert enc.grams(text) == ["to", "be", "or", "not", "to", "be", "to be", "be or", "or not", "not to", "to be"]
    want = np.zeros(32)
    for g in enc.grams(text):
        b, s = enc._bucket(g)
        want[b] += s
    np.testing.assert_allclose(enc.encode([text])[0], np.sign(want) * np.log1p(np.abs(want)), rtol=1e-6)
    # unigrams ignore word order; bigrams see it
    assert np.array_equal(hashed(dim=32).encode(["to be or"]), hashed(dim=32).encode(["or be to"]))
    assert not np.array_equal(enc.encode(["to be or"]), enc.encode(["or be to"]))


def test_hashed_is_the_same_in_another_process():
    """Python's `hash` of a string differs per process; the encoder's must not (workers on other nodes)."""
    code = ("import sys; from w2s_ray import encoders; from w2s_ray.config import EncoderConfig\n"
            "sys.stdout.buffer.write(encoders.build(EncoderConfig(dim=64, ngrams=2)).encode(['the cat sat on the mat']).tobytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=os.environ | {"PYTHONHASHSEED": "random"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == hashed(dim=64, ngrams=2).encode(["the cat sat on the mat"]).tobytes()


def test_an_hf_encoder_needs_a_path_and_a_model_that_is_here(tmp_path):
    with pytest.raises(ValueError, match="needs `path`"):
        EncoderConfig(kind="hf")
    with pytest.raises(ConfigError, match=r"embed.student.path: .*not a Hugging Face model on this machine"):
        encoders.output_dim(EncoderConfig(kind="hf", path=str(tmp_path / "nowhere")), "embed.student")
    assert encoders.output_dim(EncoderConfig(dim=100), "embed.teacher") == 100


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")  # in the test extras: CI runs these
    path = tmp_path_factory.mktemp("tiny-bert")
    return encoders.save_random_bert(str(path), sorted({w for t in TEXTS for w in t.lower().split()}))


def test_hf_mean_pooling_is_the_masked_mean_of_the_last_hidden_states(model_dir):
    from transformers import AutoModel, AutoTokenizer

    cfg = EncoderConfig(kind="hf", path=model_dir, batch_size=2, normalize=False)
    enc = encoders.build(cfg)
    assert enc.dim == 24 == encoders.output_dim(cfg, "embed.student")
    texts = [t.lower() for t in TEXTS]
    x = enc.encode(texts)
    assert x.shape == (5, 24) and np.isfinite(x).all()
    model, tok = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        for i, t in enumerate(texts):  # alone: no padding, every token real
            ids = tok([t], return_tensors="pt")
            want = model(**ids).last_hidden_state[0].mean(0).numpy() if ids["input_ids"].shape[1] else None
            if want is not None:
                np.testing.assert_allclose(x[i], want, rtol=1e-4, atol=1e-5)
    cls = encoders.build(cfg.model_copy(update={"pooling": "cls", "normalize": True})).encode(texts)
    np.testing.assert_allclose(np.linalg.norm(cls[[0, 1, 3, 4]], axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(cls[0], x[0] / np.linalg.norm(x[0]))
    # the same batches give the same bits: what a resumed embed stage relies on
    assert np.array_equal(x, encoders.build(cfg).encode(texts))
