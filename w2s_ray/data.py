"""Datasets, validation of user data, and the three seeded, disjoint splits.

- weak:     the only gold labels teachers ever see
- transfer: the student sees only the teachers' labels on these inputs
- test:     gold labels, for evaluation only

Sources are a registry (`SOURCES`, keyed like the config's `data.source`). Their loaders use no
Ray. The generated sources (MNIST-1D, `synthetic`) are split into seeded chunks, and one Ray
task (`build_splits`) maps the chunks as parallel tasks and writes the splits itself, so their
rows never reach the driver; user Parquet is read and validated in the driver, so bad data
stops before Ray starts. Splits are stored as Parquet with columns `id`
(row in the source), `x` (fixed-size list of float32) and `y`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from w2s_ray import artifacts, embedfiles, encoders, storage
from w2s_ray.config import DataConfig, check_shapes
from w2s_ray.errors import ConfigError, DataError
from w2s_ray import synthetic
from w2s_ray.mnist1d_gen import MNIST1D_FEATURES, load_mnist1d
from w2s_ray.synthetic import load_synthetic
from w2s_ray.results import DataStage, EmbedStage, Split, SplitFiles
from w2s_ray.run import RunContext
from w2s_ray.storage import RunDir

SPLITS = ("weak", "transfer", "test")


# --- sources -------------------------------------------------------------------------------


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (1,797 images), scaled to [0, 1].

    Read from the CSV file scikit-learn ships, the one its `load_digits` reads, without importing
    scikit-learn: `import sklearn.datasets` costs 2.2 s on 2 cores, paid by every command that
    loads this module. The arrays are equal to `load_digits()`'s (tested).
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DataError("data.source 'digits' needs scikit-learn's digits file (pip install scikit-learn)")
    table = np.loadtxt(path, delimiter=",")
    return (table[:, :-1] / 16.0).astype(np.float32), table[:, -1].astype(np.int64)


def _open_parquet(path: str, columns: dict[str, str] | None = None) -> pa.Table:
    """The table; with `columns` (name → what it is, named, for the message), only those
    columns, and one that is not there is an error naming it."""
    try:
        fs, p = storage.open_filesystem(path) if storage.is_uri(path) else (pafs.LocalFileSystem(), str(Path(path).resolve()))
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data file not found: {path}")
        schema = _check_one_schema(fs, p, path) if info.type == pafs.FileType.Directory else None
        if columns is None:
            return pq.read_table(p, filesystem=fs)
        names = (schema or pq.read_schema(p, filesystem=fs)).names
        for c, what in columns.items():
            if c not in names:
                raise DataError(f"{path}: {what} is missing (columns: {names})")
        return pq.read_table(p, filesystem=fs, columns=list(columns))
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read Parquet data {path}: {err}") from None


def _check_one_schema(fs: pafs.FileSystem, directory: str, path: str) -> pa.Schema:
    """A directory of Parquet files is one table only if every file has the same columns and types."""
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(directory, recursive=True))
                   if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not files:
        raise DataError(f"{path}: the directory holds no .parquet file")
    first = pq.read_schema(files[0], filesystem=fs)
    for f in files[1:]:
        schema = pq.read_schema(f, filesystem=fs)
        if not schema.remove_metadata().equals(first.remove_metadata()):
            a, b = dict(zip(first.names, map(str, first.types))), dict(zip(schema.names, map(str, schema.types)))
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise DataError(
                f"{path}: {Path(f).name} and {Path(files[0]).name} have different schemas (columns {diff}); "
                "one data set must have one schema"
            )
    return first


def load_parquet(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate user data; every error names the file and the column."""
    x, y, _, _ = read_parquet_source(cfg)
    return x, y


def read_parquet_source(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str] | None, np.ndarray | None]:
    """Features, integer labels, the class names of a string label column, and the teachers'
    own features when `data.teacher_features` / `teacher_feature_columns` name them (validated
    the same way: missing, null, ragged, non-numeric, NaN)."""
    path = cfg.path or ""
    table = _open_parquet(path)
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    names = table.column_names
    if cfg.label_column not in names:
        raise DataError(f"{path}: label column {cfg.label_column!r} is missing (columns: {names})")
    table = _missing(table, cfg, path)
    x = _features(table, cfg.features, cfg.feature_columns, path, "data.feature_columns")
    xt = None
    if cfg.teacher_features or cfg.teacher_feature_columns:
        xt = _features(table, cfg.teacher_features or "", cfg.teacher_feature_columns, path, "data.teacher_feature_columns", "teachers' ")
    y, classes = _labels(table[cfg.label_column], cfg.label_column, path, cfg.n_classes)
    return x, y, classes, xt


def _text(table: pa.Table, column: str, path: str) -> pa.ChunkedArray:
    col = table[column]
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{path}: text column {column!r} (embed.column) has type {col.type}; an encoder reads strings")
    return col


def text_rows(cfg: DataConfig, column: str) -> tuple[np.ndarray, pa.Array]:
    """What the embed stage encodes: the rows of user Parquet that have a text in `column`
    (`embed.column`), and their texts. A null text is an error (`data.missing: error`, naming
    the column and rows) or its row is left out (`drop`): no model ever sees it. Whether the
    label is there does not matter here; the data stage drops or refuses those rows itself."""
    path = cfg.path or ""
    table = _open_parquet(path, {column: f"text column {column!r} (embed.column)"})
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    col = _text(table, column, path)
    null = col.is_null().to_numpy(zero_copy_only=False)
    if null.any() and cfg.missing == "error":
        raise DataError(f"{path}: missing values (null) in text column {column!r} (embed.column): {int(null.sum())} of {len(null)} rows, "
                        f"first {np.nonzero(null)[0][:5].tolist()}. Set data.missing: drop to drop those rows, or fill them")
    keep = ~null
    return np.nonzero(keep)[0].astype(np.int64), col.filter(pa.array(keep)).combine_chunks()


def read_text_source(cfg: DataConfig, column: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """For text data (`embed`): the rows kept (their index in the user's file), their integer
    labels and the class names, validated as `read_parquet_source` validates a table; the
    features are the embed stage's vectors of those rows (`embedfiles.gather`)."""
    path = cfg.path or ""
    table = _open_parquet(path, {cfg.label_column: f"label column {cfg.label_column!r}", column: f"text column {column!r} (embed.column)"})
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    _text(table, column, path)
    table = table.append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    table = _missing(table, cfg, path, (column,))
    y, classes = _labels(table[cfg.label_column], cfg.label_column, path, cfg.n_classes)
    return table["__row"].to_numpy(), y, classes


def _features(table: pa.Table, features: str, feature_columns: list[str] | None, path: str, columns_key: str, whose: str = "") -> np.ndarray:
    """The feature matrix, after `_missing` has refused or dropped rows with nulls, NaN or inf."""
    cols = feature_columns or [features]
    for c in cols:
        if c not in table.column_names:
            raise DataError(f"{path}: {whose}feature column {c!r} is missing (columns: {table.column_names})")
    if feature_columns is None:
        col = table[features].combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type)):
            raise DataError(
                f"{path}: column {features!r} must be a list of numbers per row (or set {columns_key})"
            )
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(set(lengths.tolist())) == 1 and lengths[0] == 0:
            raise DataError(f"{path}: column {features!r} holds empty lists: no features")
        if len(set(lengths.tolist())) != 1:
            raise DataError(
                f"{path}: column {features!r} is ragged: rows have {sorted(set(lengths.tolist()))[:5]} features"
            )
        if not pa.types.is_integer(col.type.value_type) and not pa.types.is_floating(col.type.value_type):
            raise DataError(f"{path}: column {features!r} holds {col.type.value_type}, not numbers")
        return pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    arrays = []
    for c in cols:
        col = table[c]
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise DataError(f"{path}: {whose}feature column {c!r} has type {col.type}, not numeric")
        arrays.append(col.to_numpy().astype(np.float32))
    return np.stack(arrays, 1)


def _bad_rows(col: pa.ChunkedArray) -> np.ndarray:
    """Per row: null, or a NaN / inf (also inside a list of numbers)."""
    col = col.combine_chunks()
    bad = col.is_null().to_numpy(zero_copy_only=False).copy()
    kind = col.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        values = pc.list_flatten(col)
        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            v = values.to_numpy(zero_copy_only=False).astype(np.float64)  # a null element reads as NaN
            bad[np.repeat(np.arange(len(col)), lengths)[~np.isfinite(v)]] = True
    elif pa.types.is_floating(kind):
        bad |= ~np.isfinite(col.to_numpy(zero_copy_only=False).astype(np.float64))
    return bad


def _missing(table: pa.Table, cfg: DataConfig, path: str, extra: tuple[str, ...] = ()) -> pa.Table:
    """`data.missing`: rows with a null, NaN or inf in a column the run reads (and the `extra`
    ones: the text column of `embed`) are an error that names every such column at once, or
    are dropped (`drop`, said on stderr)."""
    used = [cfg.label_column, *(cfg.feature_columns or [cfg.features]), *extra]
    if cfg.teacher_features or cfg.teacher_feature_columns:
        used += cfg.teacher_feature_columns or [cfg.teacher_features]
    used = [c for c in dict.fromkeys(used) if c in table.column_names]  # a missing column is reported by its reader
    per_column = {c: _bad_rows(table[c]) for c in used}
    counts = {c: int(b.sum()) for c, b in per_column.items() if b.any()}
    if not counts:
        return table
    bad = np.logical_or.reduce(list(per_column.values()))
    listed = ", ".join(f"{c!r} ({n} rows, first {np.nonzero(per_column[c])[0][:5].tolist()})" for c, n in counts.items())
    if cfg.missing == "error":
        raise DataError(f"{path}: missing values (null, NaN or inf) in {len(counts)} column(s): {listed}; "
                        f"{int(bad.sum())} of {table.num_rows} rows in all. Set data.missing: drop to drop those rows, or fill them")
    print(f"w2s-ray: data.missing: drop: {int(bad.sum())} of {table.num_rows} rows dropped for missing values in {listed}", file=sys.stderr)
    table = table.filter(pa.array(~bad))
    if table.num_rows == 0:
        raise DataError(f"{path}: every row has a missing value (data.missing: drop)")
    return table


def _labels(col: pa.ChunkedArray, name: str, path: str, n_classes: int | None) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels 0..C-1, and for a string (or dictionary-encoded) column the class names,
    mapped in sorted order."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_boolean(col.type):  # two classes: false = 0, true = 1
        y = col.to_numpy(zero_copy_only=False).astype(np.int64)
        if len(np.unique(y)) < 2:
            raise DataError(f"{path}: label column {name!r} has fewer than 2 classes")
        return y, ["false", "true"]
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        names = np.asarray(col.to_pylist(), dtype=object)
        classes = sorted(set(names.tolist()))
        if len(classes) < 2:
            raise DataError(f"{path}: label column {name!r} has fewer than 2 classes")
        if n_classes is not None and len(classes) > n_classes:
            raise DataError(f"{path}: label column {name!r} has {len(classes)} classes, more than data.n_classes = {n_classes}")
        return np.searchsorted(np.asarray(classes, dtype=object), names).astype(np.int64), classes
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(f"{path}: label column {name!r} has type {col.type}; labels must be integers 0..C-1 or strings")
    y = col.to_numpy()
    if pa.types.is_floating(col.type):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{path}: label column {name!r} holds non-integer values; labels must be integers 0..C-1")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{path}: label column {name!r} has labels outside 0..C-1 (minimum {y.min()})")
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(f"{path}: label column {name!r} has fewer than 2 classes")
    if n_classes is not None and present[-1] >= n_classes:
        raise DataError(
            f"{path}: label column {name!r} has labels outside 0..C-1 with C = data.n_classes = {n_classes} "
            f"(largest label {present[-1]})"
        )
    if n_classes is None and present[-1] != len(present) - 1:
        raise DataError(
            f"{path}: label column {name!r} has labels outside 0..C-1: {len(present)} classes present but "
            f"largest label {present[-1]} (relabel to 0..C-1, or set data.n_classes if some classes are absent)"
        )
    return y, None


# name (the config's `data.source`) → load(cfg, map_fn) -> (x float32 [n, d], y int64 [n],
# class names or None for classes 0..C-1)
SOURCES: dict[str, Callable[[DataConfig, Callable], tuple[np.ndarray, np.ndarray, list[str] | None]]] = {
    "mnist1d": lambda cfg, map_fn: (*load_mnist1d(cfg, map_fn), None),
    "digits": lambda cfg, map_fn: (*load_digits(), None),
    "synthetic": lambda cfg, map_fn: (*load_synthetic(cfg, map_fn), None),
    "parquet": lambda cfg, map_fn: read_parquet_source(cfg),
}


def load_source(cfg: DataConfig, map_fn: Callable = map) -> tuple[np.ndarray, np.ndarray, list[str] | None, np.ndarray | None]:
    """(features, labels, class names, the teachers' own features or None)."""
    out = SOURCES[cfg.source](cfg, map_fn)
    return out if len(out) == 4 else (*out, None)


# --- splits --------------------------------------------------------------------------------


def check_sizes(cfg: DataConfig, rows: int, source: str) -> None:
    need = cfg.n_weak + cfg.n_transfer + cfg.n_test
    if need > rows:
        raise DataError(f"{source}: data.n_weak + data.n_transfer + data.n_test = {need} is larger than its {rows} rows")


def make_splits(x: np.ndarray, y: np.ndarray, cfg: DataConfig, source: str = "data", xt: np.ndarray | None = None) -> dict[str, Split]:
    check_sizes(cfg, len(y), source)
    perm = np.random.default_rng(cfg.seed).permutation(len(y))
    bounds = np.cumsum([0, cfg.n_weak, cfg.n_transfer, cfg.n_test])
    out = {}
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        ids = np.sort(perm[lo:hi])
        xt_ids = None if xt is None else np.ascontiguousarray(xt[ids], dtype=np.float32)
        out[name] = Split(ids=ids.astype(np.int64), x=np.ascontiguousarray(x[ids], dtype=np.float32), y=y[ids].astype(np.int64), xt=xt_ids)
    return out


def standardize(splits: dict[str, Split]) -> dict[str, Any]:
    """Scale every split's features in place by the weak-gold split's per-feature mean and sd
    (the only split whose statistics a weak teacher may see); a constant feature keeps sd 1.
    The teachers' own features, when there are, are scaled by their own statistics. Returns
    the statistics, which the data manifest records."""

    def scale(get) -> dict[str, list[float]]:
        weak = get(splits["weak"]).astype(np.float64)
        mean, sd = weak.mean(0), weak.std(0)
        sd[sd < 1e-12] = 1.0
        for s in splits.values():
            a = get(s)
            a[:] = ((a - mean) / sd).astype(np.float32)
        return {"mean": mean.tolist(), "sd": sd.tolist()}

    out: dict[str, Any] = scale(lambda s: s.x)
    if splits["weak"].xt is not None:
        out["teacher"] = scale(lambda s: s.xt)
    return out


def n_classes_of(cfg: DataConfig, y: np.ndarray) -> int:
    return cfg.n_classes or int(y.max()) + 1


# --- the stage -----------------------------------------------------------------------------

# (features, classes) of the built-in sources, known without generating them
BUILTIN_SHAPES = {"mnist1d": (MNIST1D_FEATURES, 10), "digits": (64, 10), "synthetic": (synthetic.FEATURES, synthetic.CLASSES)}


def check_models(ctx: RunContext, in_dim: int, n_classes: int, teacher_dim: int | None = None) -> None:
    """The config against the data's shape (teacher view, both models built on the meta device,
    their training memory), then the models and their sizes in the log."""
    params = check_shapes(ctx.cfg, in_dim, n_classes, teacher_dim)
    t, s = ctx.cfg.teachers.model, ctx.cfg.student.model
    ctx.log(f"models: teachers {t.name} (width {t.width}, depth {t.depth}) {params['teachers.model']:,} parameters; "
            f"student {s.name} (width {s.width}, depth {s.depth}) {params['student.model']:,} parameters")


GENERATED = ("mnist1d", "synthetic")
"""Sources generated in chunks by Ray tasks: built in a Ray task that writes the splits itself
(above `IN_DRIVER_ROWS`)."""

IN_DRIVER_ROWS = 20_000
"""A generated source this small is built in the driver, with no Ray task: the task and its
chunk tasks each wait for a worker process to start and import torch, which costs more than
the rows. Measured on 2 cores (small test config, 1,500 MNIST-1D rows): the data stage took
8.4 s from the CLI with `ray.init` and tasks; MNIST-1D's generator makes 12,000 rows (the
default) in 2.5 s on one core, 20,000 in about 4 s. The driver then holds at most 20,000 rows
(3.2 MB at MNIST-1D's 40 features), whatever `num_samples` is above it: its memory stays
flat in N. The bits are those of the chunked tasks (chunks are seeded by their index, and the
Ray and in-process runs are compared file by file in `tests/test_pipeline.py`)."""


def write_splits(cfg: DataConfig, x: np.ndarray, y: np.ndarray, classes: list[str] | None, run: RunDir, d: Path,
                 xt: np.ndarray | None = None) -> dict[str, Any]:
    """Split, standardize and write the three splits; return the manifest's fields."""
    splits = make_splits(x, y, cfg, cfg.path or cfg.source, xt)
    scaling = standardize(splits) if cfg.standardize else None
    for name, s in splits.items():
        run.write_parquet(d / f"{name}.parquet", s.table(), artifacts.ROW_GROUP)
    fields = {"n_classes": n_classes_of(cfg, y), "in_dim": int(x.shape[1]), "sizes": {k: len(s.y) for k, s in splits.items()},
              "standardize": scaling, "classes": classes}
    if xt is not None:
        fields["teacher_dim"] = int(xt.shape[1])
    return fields


def build_splits(cfg: DataConfig, run: RunDir, d: Path, map_fn: Callable) -> dict[str, Any]:
    """A generated source, from chunk generation (`map_fn`: Ray tasks) to split files, in a
    task: the rows stay in this worker and the files it writes (published to the run's store);
    the driver gets the manifest's fields. Measured with 1M synthetic rows on 2 CPUs: see
    benchmarks/README.md."""
    x, y, classes, xt = load_source(cfg, map_fn)
    return write_splits(cfg, x, y, classes, run, d, xt)


def build_text_stage(ctx: RunContext, d: Path, embed: Callable[[], EmbedStage]) -> dict[str, Any]:
    """Text data (`embed`): labels read and checked, the models checked against the encoders'
    widths (both before Ray starts), then the embed stage (`embed()`: cached, or computed by
    its encoder actors), and the splits of the kept rows' vectors. The vectors pass through
    this process once, as user Parquet's features do."""
    cfg, e = ctx.cfg.data, ctx.cfg.embed
    rows, y, classes = read_text_source(cfg, e.column)
    check_sizes(cfg, len(rows), cfg.path or "data")  # before the texts are encoded
    dims = {role: encoders.output_dim(enc, f"embed.{role}") for role, enc in (("student", e.student), ("teacher", e.teacher)) if enc is not None}
    check_models(ctx, dims["student"], n_classes_of(cfg, y), dims.get("teacher"))
    emb = embed()
    ctx.log(f"data: building splits of {len(rows):,} texts ({e.column!r}) → {d}")
    x = embedfiles.gather(ctx.run, emb.dirs["student"], rows)
    xt = embedfiles.gather(ctx.run, emb.dirs["teacher"], rows) if "teacher" in emb.dirs else None
    ctx.run.reset(d)
    return write_splits(cfg, x, y, classes, ctx.run, d, xt)


def build_stage(ctx: RunContext, d: Path, embed: Callable[[], EmbedStage] | None = None) -> dict[str, Any]:
    """The data stage's files and manifest (the caller holds the stage's lock)."""
    cfg = ctx.cfg.data
    if ctx.cfg.embed is not None:
        if embed is None:
            raise ValueError("text data (embed): the data stage needs the embed stage (`embed`)")
        return ctx.run.write_manifest(d, ctx.keys.data, **build_text_stage(ctx, d, embed))
    shape = BUILTIN_SHAPES.get(cfg.source)
    if shape and cfg.n_classes is not None and cfg.n_classes < shape[1]:
        raise ConfigError(f"data.n_classes: {cfg.n_classes} is fewer than the {shape[1]} classes of data.source={cfg.source!r} (leave it unset)")
    if shape:  # known without generating: the models are checked before Ray starts
        check_models(ctx, shape[0], cfg.n_classes or shape[1])
    ctx.log(f"data: building {cfg.source} splits → {d}")
    if cfg.source in GENERATED and cfg.num_samples > IN_DRIVER_ROWS:
        ctx.ray()
        ctx.run.reset(d)
        fields = ctx.get(ctx.submit(build_splits, cfg, ctx.run, d, ctx.executor.map_fn()))
        for name in SPLITS:
            ctx.run.need(d / f"{name}.parquet", f"data: the {name} split (written by a task on another node)")
    else:  # digits, user data and a small generated source (`IN_DRIVER_ROWS`): made here, user data before Ray starts
        # a built-in source's rows need no check once its shape is known (above): they are made
        # while Ray starts, when the stages after this one need it (`RunContext.ray_meanwhile`)
        x, y, classes, xt = ctx.ray_meanwhile(lambda: load_source(cfg)) if shape else load_source(cfg)
        if not shape:  # user data is read in this process: still before Ray starts
            check_models(ctx, int(x.shape[1]), n_classes_of(cfg, y), None if xt is None else int(xt.shape[1]))
        ctx.run.reset(d)
        fields = write_splits(cfg, x, y, classes, ctx.run, d, xt)
        del x, y, xt
    return ctx.run.write_manifest(d, ctx.keys.data, **fields)


def stage_data(ctx: RunContext, embed: Callable[[], EmbedStage] | None = None) -> DataStage:
    """The three splits, built once per data key. A generated source above `IN_DRIVER_ROWS` is
    built in a Ray task (`build_splits`); digits, user Parquet and small generated sources are made here, user data validated before Ray
    starts (its rows then pass through the driver once: memory grows with the file), a built-in
    source while Ray starts when the command needs it next (`RunContext.ray_meanwhile`). Text data
    (`embed`) calls `embed()` for the embed stage's vectors, only when the splits are not cached."""
    d = ctx.run.open_stage("data", ctx.keys.data)
    with ctx.run.claim(d, "data stage", lambda: artifacts.read_manifest(d)) as manifest:
        if manifest is None:
            manifest = build_stage(ctx, d, embed)
        else:
            ctx.log(f"data: cached {d}")
            check_models(ctx, manifest["in_dim"], manifest["n_classes"], manifest.get("teacher_dim"))
    return DataStage(d, SplitFiles(d, SPLITS), manifest["n_classes"], manifest["in_dim"], manifest.get("classes"), manifest["sizes"],
                     manifest.get("teacher_dim"))
