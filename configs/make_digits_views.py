"""Write the two-view digits table that `configs/digits_views.yaml` reads.

The standard weak-to-strong workflow gives the teachers a weak model's features and the
student a strong model's (for language models: embeddings of a small and of a large model,
computed once and saved as Parquet). Here, on built-in data: scikit-learn's 8×8 digits, the
teachers see a 4×4 low-resolution view (2×2 average pooling: 16 features), the student all 64
pixels. Columns: `pixels` (64 floats), `lowres` (16 floats), `label` (0–9).

    python configs/make_digits_views.py [OUT.parquet]     # default: runs/digits_views.parquet
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from w2s_ray.data import load_digits


def fixed(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).reshape(-1)), a.shape[1])


def main(out: str = "runs/digits_views.parquet") -> None:
    x, y = load_digits()
    lowres = x.reshape(-1, 4, 2, 4, 2).mean((2, 4)).reshape(len(x), 16)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"pixels": fixed(x), "lowres": fixed(lowres), "label": y}), tmp)
    tmp.rename(path)
    print(f"{path}: {len(y)} rows, pixels (64) for the student, lowres (16) for the teachers")


if __name__ == "__main__":
    main(*sys.argv[1:])
