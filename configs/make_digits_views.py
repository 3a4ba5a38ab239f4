"""Write the two-view digits table that `configs/digits_views.yaml` reads.

The standard weak-to-strong workflow gives the teachers a weak model's features and the
student a strong model's (for language models: embeddings of a small and of a large model,
computed once and saved as Parquet). Here, on built-in data: scikit-learn's 8×8 digits, the
teachers see a 4×4 low-resolution view (2×2 average pooling: 16 features), the student all 64
pixels (`w2s_ray.tasks.make_digits_views`). Columns: `pixels` (64 floats), `lowres` (16
floats), `label` (0–9).

    python configs/make_digits_views.py [OUT.parquet]     # default: runs/digits_views.parquet
"""

import sys

from w2s_ray.tasks import write_table


def main(out: str = "runs/digits_views.parquet") -> None:
    print(write_table("digits_views", out))


if __name__ == "__main__":
    main(*sys.argv[1:])
