import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from w2s_ray.config import DataConfig
from w2s_ray.data import load_parquet, make_splits
from w2s_ray.mnist1d_gen import MNIST1D_FEATURES, mnist1d_chunk, mnist1d_plan
from w2s_ray.errors import ConfigError, DataError


def write(tmp_path, x, y, name="d.parquet", **extra):
    cols = {"x": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).reshape(-1)), np.asarray(x).shape[1]) if x is not None else None, "y": y}
    cols = {k: v for k, v in cols.items() if v is not None}
    cols.update(extra)
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return str(path)


def cfg(path, **kw):
    return DataConfig(source="parquet", path=path, n_weak=10, n_transfer=10, n_test=10, **kw)


def good(n=40, d=5, c=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)), np.arange(n) % c


def test_valid_parquet_with_list_column(tmp_path):
    x, y = good()
    xs, ys = load_parquet(cfg(write(tmp_path, x, y)))
    assert xs.shape == (40, 5) and xs.dtype == np.float32 and ys.tolist() == y.tolist()


def test_valid_parquet_with_feature_columns(tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"a": np.arange(30.0), "b": np.arange(30), "label": np.arange(30) % 2}), path)
    xs, ys = load_parquet(cfg(str(path), feature_columns=["a", "b"], label_column="label"))
    assert xs.shape == (30, 2)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y), "missing values (null, NaN or inf) in 1 column(s): 'x' (1 rows, first [1])"),
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 3, np.inf, x), y), "NaN or inf"),
        (lambda x, y: (x, np.where(np.arange(len(y)) == 2, 7, y)), "label column 'y' has labels outside 0..C-1"),
        (lambda x, y: (x, np.where(np.arange(len(y)) == 2, -1, y)), "labels outside 0..C-1"),
        (lambda x, y: (x, np.zeros_like(y)), "fewer than 2 classes"),
        (lambda x, y: (x, y + 0.5), "non-integer"),
    ],
)
def test_bad_values_name_file_and_column(tmp_path, mutate, needle):
    x, y = mutate(*good())
    path = write(tmp_path, x, y)
    with pytest.raises(DataError) as err:
        load_parquet(cfg(path))
    assert needle in str(err.value) and path in str(err.value)


def test_ragged_missing_empty_and_absent(tmp_path):
    ragged = tmp_path / "r.parquet"
    pq.write_table(pa.table({"x": [[1.0, 2.0], [1.0]], "y": [0, 1]}), ragged)
    with pytest.raises(DataError, match="ragged"):
        load_parquet(cfg(str(ragged)))
    x, y = good()
    with pytest.raises(DataError, match="label column 'target' is missing"):
        load_parquet(cfg(write(tmp_path, x, y), label_column="target"))
    with pytest.raises(DataError, match="feature column 'feat' is missing"):
        load_parquet(cfg(write(tmp_path, x, y), features="feat"))
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"x": pa.array([], pa.list_(pa.float32())), "y": pa.array([], pa.int64())}), empty)
    with pytest.raises(DataError, match="no rows"):
        load_parquet(cfg(str(empty)))
    with pytest.raises(DataError, match="not found"):
        load_parquet(cfg(str(tmp_path / "absent.parquet")))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="cannot read Parquet"):
        load_parquet(cfg(str(junk)))


def test_n_classes_allows_absent_classes_but_not_labels_beyond(tmp_path):
    x, y = good(c=2)
    y = np.where(np.arange(len(y)) == 0, 3, y)  # classes 0, 1, 3 present
    path = write(tmp_path, x, y)
    with pytest.raises(DataError, match="largest label 3"):
        load_parquet(cfg(path))
    assert load_parquet(cfg(path, n_classes=4))[1].max() == 3
    with pytest.raises(DataError, match="data.n_classes = 3"):
        load_parquet(cfg(path, n_classes=3))


def test_splits_are_disjoint_seeded_and_checked(tmp_path):
    x, y = good(n=100)
    c = DataConfig(source="parquet", path="p", n_weak=20, n_transfer=30, n_test=40, seed=3)
    a, b = make_splits(x, y, c), make_splits(x, y, c)
    ids = [set(a[s].ids.tolist()) for s in ("weak", "transfer", "test")]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert [len(i) for i in ids] == [20, 30, 40]
    assert all(np.array_equal(a[s].ids, b[s].ids) for s in a)
    other = make_splits(x, y, c.model_copy(update={"seed": 4}))
    assert not np.array_equal(other["weak"].ids, a["weak"].ids)
    assert np.array_equal(a["test"].x, x[a["test"].ids].astype(np.float32))
    with pytest.raises(DataError, match="larger than its 100 rows"):
        make_splits(x, y, c.model_copy(update={"n_test": 60}))


def test_mnist1d_plan_covers_the_requested_size():
    plan = mnist1d_plan(DataConfig(num_samples=12345, chunk_size=4000, n_weak=100, n_transfer=100, n_test=100))
    assert sum(n for n, _ in plan) == 12350 and all(n % 10 == 0 for n, _ in plan)
    assert len({s for _, s in plan}) == len(plan)


@pytest.mark.slow  # the CLI gets past validation and imports the pipeline
def test_cli_stops_on_bad_data_before_ray_starts(tmp_path):
    x, y = good()
    x[4, 1] = np.nan
    y[9] = 11
    path = write(tmp_path, x, y)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"data:\n  source: parquet\n  path: {path}\n  n_weak: 10\n  n_transfer: 10\n  n_test: 10\noutput:\n  root: {tmp_path}/runs\n")
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", str(conf)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"{path}: missing values (null, NaN or inf) in 1 column(s): 'x' (1 rows, first [4])" in out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "d.parquet"]  # no run folder, config.yaml or empty stage left


def test_editing_user_data_changes_the_cache_key(tmp_path):
    import os

    from w2s_ray.config import StageKeys, parse_config

    x, y = good()
    path = write(tmp_path, x, y)
    cfg = parse_config({"data": {"source": "parquet", "path": path, "n_weak": 10, "n_transfer": 10, "n_test": 10}})
    before = StageKeys(cfg).data
    assert StageKeys(cfg).data == before
    write(tmp_path, x * 2, y)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert StageKeys(cfg).data != before


def test_a_parquet_directory_with_two_schemas_is_refused(tmp_path):
    x, y = good()
    d = tmp_path / "parts"
    d.mkdir()
    write(d, x, y, name="a.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x.astype(np.float64))), "label": y}), d / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet and a.parquet have different schemas \(columns \['label', 'x', 'y'\]\)"):
        load_parquet(DataConfig(source="parquet", path=str(d), n_weak=10, n_transfer=10, n_test=10))


def test_standardization_uses_the_weak_split_only_and_is_recorded():
    from w2s_ray.data import standardize

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(1000, 50, (300, 1)), rng.normal(0, 0.01, (300, 1)), np.ones((300, 1))], 1).astype(np.float32)
    y = rng.integers(0, 3, 300)
    splits = make_splits(x, y, DataConfig(source="digits", n_weak=100, n_transfer=100, n_test=100))
    weak_before = splits["weak"].x.copy()
    stats = standardize(splits)
    assert np.allclose(stats["mean"], weak_before.mean(0), rtol=1e-5) and stats["sd"][2] == 1.0  # a constant feature keeps sd 1
    assert np.allclose(splits["weak"].x[:, :2].mean(0), 0, atol=1e-4) and np.allclose(splits["weak"].x[:, :2].std(0), 1, atol=1e-3)
    assert not np.allclose(splits["test"].x[:, 0].mean(), 0, atol=1e-6)  # other splits use the weak split's statistics


def test_user_tables_default_to_standardized_features_and_an_mlp_student():
    from w2s_ray.config import parse_config

    table = parse_config({"data": {"source": "parquet", "path": "t.parquet", "feature_columns": ["a", "b"]}})
    assert table.data.standardize and table.student.model.name == "mlp" and table.student.model.width >= 8 * table.teachers.model.width
    sequence = parse_config({"data": {"source": "parquet", "path": "t.parquet"}})  # a list column: a sequence
    assert sequence.data.standardize and sequence.student.model.name == "cnn1d"
    assert not parse_config({}).data.standardize  # built-in sources are already on a fixed scale
    named = parse_config({"data": {"source": "parquet", "path": "t.parquet", "feature_columns": ["a"]}, "student": {"model": {"name": "logistic"}}})
    assert named.student.model.name == "logistic"


@pytest.mark.parametrize("encode", [lambda a: a, lambda a: a.dictionary_encode()], ids=["string", "dictionary"])
def test_string_labels_map_to_classes_in_sorted_order(tmp_path, encode):
    from w2s_ray.data import read_parquet_source

    x, _ = good(n=6)
    names = ["setosa", "virginica", "versicolor", "setosa", "virginica", "versicolor"]
    path = write(tmp_path, x, None, label=encode(pa.array(names)))
    xs, ys, classes, _ = read_parquet_source(cfg(path, label_column="label"))
    assert classes == ["setosa", "versicolor", "virginica"]
    assert ys.tolist() == [0, 2, 1, 0, 2, 1] and xs.shape == (6, 5)
    with pytest.raises(DataError, match="3 classes, more than data.n_classes = 2"):
        read_parquet_source(cfg(path, label_column="label", n_classes=2))


def test_digits_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits as sklearn_digits

    from w2s_ray.data import load_digits

    x, y = load_digits()
    d = sklearn_digits()
    assert np.array_equal(x, (d.data / 16.0).astype(np.float32)) and np.array_equal(y, d.target)


def test_the_synthetic_source_is_seeded_shaped_like_mnist1d_and_learnable():
    from w2s_ray.synthetic import load_synthetic

    cfg = DataConfig(source="synthetic", num_samples=6000, chunk_size=1000, n_weak=2000, n_transfer=2000, n_test=2000)
    x, y = load_synthetic(cfg)
    x2, y2 = load_synthetic(cfg)
    assert x.shape == (6000, 40) and x.dtype == np.float32 and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert set(np.unique(y)) == set(range(10))
    other, _ = load_synthetic(cfg.model_copy(update={"seed": 1}))
    assert not np.array_equal(x, other)
    # nearest class mean on the first half: far above chance (0.1), far below perfect
    means = np.stack([x[:3000][y[:3000] == c].mean(0) for c in range(10)])
    acc = float(((x[3000:, None, :] - means[None]) ** 2).sum(-1).argmin(1).__eq__(y[3000:]).mean())
    assert 0.2 < acc < 0.95, acc


def test_teachers_can_read_their_own_feature_columns(tmp_path):
    from w2s_ray.data import read_parquet_source, standardize

    x, y = good()
    small = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x[:, :2] * 10 + 3, np.float32).reshape(-1)), 2)
    path = write(tmp_path, x, y, xt=small, a=pa.array(x[:, 0]), b=pa.array(x[:, 1]))
    xs, ys, _, xt = read_parquet_source(cfg(path, teacher_features="xt"))
    assert xs.shape == (40, 5) and xt.shape == (40, 2) and np.allclose(xt, x[:, :2] * 10 + 3, atol=1e-4)
    assert np.array_equal(read_parquet_source(cfg(path, teacher_feature_columns=["a", "b"]))[3], x[:, :2].astype(np.float32))
    # split row for row with the student's features; each scaled by its own weak-split statistics
    c = cfg(path, teacher_features="xt")
    splits = make_splits(xs, ys, c, xt=xt)
    stats = standardize(splits)
    assert len(stats["mean"]) == 5 and len(stats["teacher"]["mean"]) == 2
    assert np.allclose(splits["weak"].xt.mean(0), 0, atol=1e-5) and splits["test"].xt.shape == (10, 2)
    back = splits["test"].table()
    assert back.column_names == ["id", "x", "y", "xt"]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda x: {"xt": pa.array([[1.0, 2.0]] * 39 + [[1.0]])}, "column 'xt' is ragged"),
        (lambda x: {"xt": pa.array([[1.0, float("nan")]] * 40)}, "'xt' \\(40 rows"),
        (lambda x: {"xt": pa.array(["a"] * 40)}, "column 'xt' must be a list of numbers per row \\(or set data.teacher_feature_columns\\)"),
        (lambda x: {}, "teachers' feature column 'xt' is missing"),
    ],
)
def test_bad_teacher_features_name_the_column(tmp_path, make, needle):
    from w2s_ray.data import read_parquet_source

    x, y = good()
    with pytest.raises(DataError, match=needle):
        read_parquet_source(cfg(write(tmp_path, x, y, **make(x)), teacher_features="xt"))


def test_teacher_features_are_for_user_parquet():
    from w2s_ray.config import parse_config

    with pytest.raises(ConfigError, match="data.teacher_features / data.teacher_feature_columns name columns of user Parquet"):
        parse_config({"data": {"teacher_features": "small"}})


def test_every_column_with_missing_values_is_named_at_once_or_its_rows_dropped(tmp_path, capsys):
    from w2s_ray.data import read_parquet_source

    n = 40
    rng = np.random.default_rng(0)
    a = rng.normal(size=n)
    a[[3, 9]] = np.nan
    b = pa.array([None if i == 5 else float(i) for i in range(n)])
    label = pa.array([None if i == 7 else str(i % 3) for i in range(n)])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"a": a, "b": b, "c": np.arange(n, dtype=np.float64), "label": label}), path)
    conf = dict(feature_columns=["a", "b", "c"], label_column="label")
    with pytest.raises(DataError) as err:
        read_parquet_source(cfg(str(path), **conf))
    msg = str(err.value)
    assert "in 3 column(s): 'label' (1 rows, first [7]), 'a' (2 rows, first [3, 9]), 'b' (1 rows, first [5])" in msg
    assert "4 of 40 rows" in msg and "data.missing: drop" in msg and str(path) in msg
    x, y, classes, _ = read_parquet_source(cfg(str(path), missing="drop", **conf))
    assert x.shape == (36, 3) and len(y) == 36 and classes == ["0", "1", "2"]
    assert not np.isin(x[:, 2], [3, 5, 7, 9]).any()  # the dropped rows, by their `c` value
    assert "4 of 40 rows dropped" in capsys.readouterr().err


def test_a_null_inside_a_list_of_features_is_a_missing_value(tmp_path):
    path = tmp_path / "l.parquet"
    rows = [[1.0, 2.0]] * 39 + [[1.0, None]]
    pq.write_table(pa.table({"x": pa.array(rows, pa.list_(pa.float64())), "y": np.arange(40) % 2}), path)
    with pytest.raises(DataError, match=r"'x' \(1 rows, first \[39\]\)"):
        load_parquet(cfg(str(path)))
    assert load_parquet(cfg(str(path), missing="drop"))[0].shape == (39, 2)


def test_boolean_labels_are_two_classes(tmp_path):
    from w2s_ray.data import read_parquet_source

    x, _ = good()
    path = write(tmp_path, x, pa.array([i % 3 == 0 for i in range(40)]))
    _, y, classes, _ = read_parquet_source(cfg(path))
    assert classes == ["false", "true"] and y.tolist() == [int(i % 3 == 0) for i in range(40)]


def test_fewer_classes_than_a_built_in_source_has_stops_before_ray(tmp_path):
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", "--set", "data.source=digits", "--set", "data.n_classes=3",
                          "--set", f"output.root={tmp_path}", "--set", "data.n_weak=300", "--set", "data.n_transfer=500", "--set", "data.n_test=500"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "data.n_classes: 3 is fewer than the 10 classes of data.source='digits'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "ray" not in out.stderr.lower().replace("w2s-ray", "")
    assert not any(tmp_path.iterdir())  # a failed run leaves nothing: no config.yaml, no empty stage folder


def test_the_mnist1d_width_constant_is_the_package_s():
    import mnist1d.data

    assert MNIST1D_FEATURES == mnist1d.data.get_dataset_args().final_seq_length == mnist1d_chunk(20, 0)[0].shape[1]
