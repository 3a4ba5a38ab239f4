"""(i) Encoder throughput (`w2s_ray.encoders`), without Ray: rows per second of each encoder in
one process, medians of --reps, beside a fair reference.

- `hashed` against scikit-learn's `HashingVectorizer` (Cython-hashed word n-grams, the usual
  tool for this) with the same buckets, n-grams, signs, log counts and L2 norm; 1 thread.
- `hf`: a BERT with random weights built here (`encoders.save_random_bert`: no download), at
  the size of a small sentence encoder (--hidden, --layers), on --threads threads, and on the
  GPU when there is one.

The texts are synthetic: --rows sentences of 8–32 words drawn (Zipf) from a 5,000-word vocabulary.
The Ray Data actor pool that will run these encoders in the embed stage is not built yet (issue 23).

    python benchmarks/bench_embed.py [--rows 20000] [--threads 2] [--reps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile

import common  # noqa: F401
import numpy as np
import torch

from w2s_ray import encoders
from w2s_ray.config import EncoderConfig


def corpus(rows: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(5000)]
    ids = np.minimum(rng.zipf(1.3, size=rows * 32), len(vocab)) - 1
    lengths = rng.integers(8, 33, size=rows)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [" ".join(vocab[j] for j in ids[s:s + n]) for s, n in zip(starts, lengths)], vocab


def sklearn_hashed(texts: list[str], dim: int, ngrams: int) -> np.ndarray:
    from sklearn.feature_extraction.text import HashingVectorizer

    v = HashingVectorizer(n_features=dim, ngram_range=(1, ngrams), alternate_sign=True, norm=None, token_pattern=r"(?u)\b\w+\b")
    x = v.transform(texts).toarray()
    x = np.sign(x) * np.log1p(np.abs(x))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a few hundred rows and a tiny model, once: checks the script runs")
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.hidden, a.layers, a.reps = 300, 32, 1, 1
    texts, vocab = corpus(a.rows)
    print(f"{a.rows} texts, {np.mean([len(t.split()) for t in texts]):.1f} words each on average; medians of {a.reps}")

    torch.set_num_threads(1)
    sklearn_hashed(texts[:10], 16, 1)  # imports scikit-learn outside the timings
    for dim, ngrams in ((256, 1), (1024, 2)):
        cfg = EncoderConfig(kind="hashed", dim=dim, ngrams=ngrams)
        ours, ts, _ = common.timed(lambda: encoders.build(cfg).encode(texts), a.reps)  # a fresh encoder: no warm token cache
        ref, rs, _ = common.timed(lambda: sklearn_hashed(texts, dim, ngrams), a.reps)
        print(f"hashed dim={dim} ngrams={ngrams}, 1 process × 1 thread: {a.rows / ours:,.0f} rows/s {common.fmt_times(ts)}; "
              f"sklearn HashingVectorizer (same layout): {a.rows / ref:,.0f} rows/s {common.fmt_times(rs)}; ratio ours / sklearn = {ref / ours:.2f}x")

    with tempfile.TemporaryDirectory() as d:
        path = encoders.save_random_bert(d, vocab, hidden=a.hidden, layers=a.layers, heads=max(1, a.hidden // 64))
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            torch.set_num_threads(a.threads)
            cfg = EncoderConfig(kind="hf", path=path, batch_size=64, max_length=128)
            enc = encoders.HuggingFace(cfg, device)
            enc.encode(texts[:64])  # warm-up
            med, ts, _ = common.timed(lambda: enc.encode(texts), a.reps)
            where = f"1 process × {a.threads} thread(s)" if device == "cpu" else torch.cuda.get_device_name()
            print(f"hf random BERT hidden={a.hidden} layers={a.layers}, batch 64, {where}: {a.rows / med:,.0f} rows/s {common.fmt_times(ts)}")


if __name__ == "__main__":
    main()
