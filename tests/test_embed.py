"""The embed stage (`w2s_ray.embed`): text data to the views' vectors, checked before Ray,
cached per encoder, resumed part by part, gathered row by row into the data stage; on Ray
through Ray Data's encoder pool, with the bits of the in-process run."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from w2s_ray import encoders
from w2s_ray.artifacts import matrix
from w2s_ray.config import EncoderConfig, StageKeys, parse_config
from w2s_ray.errors import ConfigError, DataError
from w2s_ray.executor import InProcess
from w2s_ray.pipeline import run_pipeline

WORDS = [f"w{i}" for i in range(60)]


def write_texts(path, n=400, seed=0, nulls=()):
    """Texts whose words lean to a band of the vocabulary per class (4 classes, string labels)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        c = int(rng.integers(4))
        words = [WORDS[(15 * c + int(rng.integers(20))) % 60] if rng.random() < 0.5 else WORDS[int(rng.integers(60))] for _ in range(int(rng.integers(3, 12)))]
        texts.append(" ".join(words))
        labels.append("abcd"[c])
    for i in nulls:
        texts[i] = None
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "label": labels, "n": np.arange(n)}), path)
    return texts


def text_config(tmp_path, embed=None, **sections):
    base = {
        "data": {"source": "parquet", "path": str(tmp_path / "t.parquet"), "label_column": "label", "n_weak": 60, "n_transfer": 150,
                 "n_test": 100, "standardize": False},
        "embed": {"column": "text", "student": {"kind": "hashed", "dim": 64, "ngrams": 2}, "teacher": {"kind": "hashed", "dim": 16},
                  "rows_per_part": 64, **(embed or {})},
        "teachers": {"k": 4, "epochs": 5, "model": {"name": "mlp", "width": 8}},
        "student": {"epochs": 2, "seeds": 1},
        "output": {"root": str(tmp_path / "runs"), "name": "t"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base, "test")


def split_rows(data) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    out = {}
    for name in ("weak", "transfer", "test"):
        t = pq.read_table(data.dir / f"{name}.parquet")
        out[name] = (t["id"].to_numpy(), matrix(t["x"]), matrix(t["xt"]) if "xt" in t.column_names else None)
    return out


def test_the_splits_hold_each_kept_rows_vectors_of_both_views(tmp_path):
    """The identity: a split row's features are the student encoder's vector of its text, and its
    teachers' features the teacher encoder's, recomputed here; rows without a text are dropped
    (`data.missing: drop`), and ids count the kept rows as user Parquet's do."""
    texts = write_texts(tmp_path / "t.parquet", nulls=(3, 50, 51))
    cfg = text_config(tmp_path, data={"missing": "drop"})
    s = run_pipeline(cfg, until="data", executor=InProcess())
    kept = [t for t in texts if t is not None]
    student = encoders.build(cfg.embed.student).encode(kept)
    teacher = encoders.build(cfg.embed.teacher).encode(kept)
    assert s.data.in_dim == 64 and s.data.teacher_dim == 16 and s.data.classes == ["a", "b", "c", "d"]
    seen = 0
    for name, (ids, x, xt) in split_rows(s.data).items():
        assert np.array_equal(x, student[ids]) and np.array_equal(xt, teacher[ids]), name
        seen += len(ids)
    assert seen == 310
    # both views in their own directory, each with its manifest; the parts are sealed
    assert set(s.embed.dirs) == {"student", "teacher"} and len(set(s.embed.dirs.values())) == 2
    man = json.loads((s.embed.dirs["student"] / "manifest.json").read_text())
    assert man["rows"] == 397 and man["dim"] == 64 and man["parts"] == 7


def test_one_encoder_for_both_views_is_one_directory_and_no_teacher_features(tmp_path):
    write_texts(tmp_path / "t.parquet")
    cfg = text_config(tmp_path, embed={"teacher": None})
    s = run_pipeline(cfg, until="data", executor=InProcess())
    assert list(s.embed.dirs) == ["student"] and s.data.teacher_dim is None
    same = text_config(tmp_path, embed={"teacher": cfg.embed.student.model_dump()})
    assert StageKeys(same).embed("teacher") == StageKeys(same).embed("student")


def test_keys_follow_the_text_the_encoder_and_nothing_else(tmp_path):
    write_texts(tmp_path / "t.parquet")
    cfg = text_config(tmp_path)
    k = StageKeys(cfg)
    assert k.embed("student") != k.embed("teacher")
    # the student's training, the teachers, where encoders run and data.missing do not re-encode
    for other in (text_config(tmp_path, student={"epochs": 9}), text_config(tmp_path, teachers={"k": 8}),
                  text_config(tmp_path, embed={"resources": {"num_actors": 1}}), text_config(tmp_path, data={"missing": "drop"})):
        assert StageKeys(other).embed("student") == k.embed("student")
    assert StageKeys(text_config(tmp_path, embed={"student": {"dim": 32}})).embed("student") != k.embed("student")
    before = k.embed("student")  # keys are read when asked for: the file's size and mtime now
    write_texts(tmp_path / "t.parquet", seed=1)  # the file changed (its size or its mtime: a rewrite within
    os.utime(tmp_path / "t.parquet", ns=(1, 1))  # the clock's tick at the same size is not seen, as for any user data)
    assert StageKeys(text_config(tmp_path)).embed("student") != before


def test_an_interrupted_or_damaged_stage_encodes_only_what_is_missing_or_bad(tmp_path, capsys):
    write_texts(tmp_path / "t.parquet")
    cfg = text_config(tmp_path, embed={"teacher": None})
    s = run_pipeline(cfg, until="embed", executor=InProcess())
    d = s.embed.dirs["student"]
    parts = sorted((d / "parts").glob("*.parquet"))
    before = {p.name: p.read_bytes() for p in parts}
    (d / "manifest.json").unlink()  # interrupted before the manifest
    parts[1].unlink()  # a part never written
    raw = bytearray(parts[4].read_bytes())  # a same-size damaged part: it still parses
    raw[len(raw) // 2] ^= 0xFF
    parts[4].write_bytes(bytes(raw))
    capsys.readouterr()
    run_pipeline(cfg, until="embed", executor=InProcess())
    err = capsys.readouterr().err
    assert "encoding 128 texts in 2 of 7 parts" in err and f"part {parts[4].name} is damaged" in err, err
    assert {p.name: p.read_bytes() for p in sorted((d / "parts").glob("*.parquet"))} == before
    assert (d / "manifest.json").is_file()
    # complete: cached, and the data stage is built without encoding again
    capsys.readouterr()
    run_pipeline(cfg, until="data", executor=InProcess())
    err = capsys.readouterr().err
    assert "encoding" not in err and "embed: cached" in err, err


@pytest.mark.parametrize("case, match", [
    ("no column", r"t.parquet: text column 'body' \(embed.column\) is missing \(columns: \['text', 'label', 'n'\]\)"),
    ("not text", r"t.parquet: text column 'n' \(embed.column\) has type int64; an encoder reads strings"),
    ("null text", r"missing values \(null, NaN or inf\) in 1 column\(s\): 'text' \(2 rows, first \[3, 7\]\).*data.missing: drop"),
    ("no model", r"embed.student.path: .*not a Hugging Face model on this machine"),
    ("too few rows", r"t.parquet: data.n_weak \+ data.n_transfer \+ data.n_test = 410 is larger than its 400 rows"),
])
def test_bad_text_data_stops_before_ray_naming_the_column_or_key(tmp_path, case, match):
    write_texts(tmp_path / "t.parquet", nulls=(3, 7) if case == "null text" else ())
    embed = {"no column": {"column": "body"}, "not text": {"column": "n"}, "null text": {},
             "no model": {"student": {"kind": "hf", "path": str(tmp_path / "nowhere")}}, "too few rows": {}}[case]
    cfg = text_config(tmp_path, embed=embed, data={"n_test": 200} if case == "too few rows" else {})

    class NoRay(InProcess):
        def start(self, cfg):
            raise AssertionError("Ray was started")

    with pytest.raises((DataError, ConfigError), match=match):
        run_pipeline(cfg, until="data", executor=NoRay())
    assert not list((tmp_path / "runs").rglob("*.parquet"))


def test_embed_is_for_user_parquet_with_the_encoders_as_its_features(tmp_path):
    with pytest.raises(ConfigError, match=r"embed: encoders read a text column of user Parquet; data.source is 'mnist1d'"):
        parse_config({"embed": {"column": "text", "student": {}}}, "test")
    with pytest.raises(ConfigError, match=r"embed: the encoders make the features; remove data.feature_columns"):
        text_config(tmp_path, data={"feature_columns": ["n"]})
    with pytest.raises(ConfigError, match=r"embed.column is the label column 'label'"):
        text_config(tmp_path, embed={"column": "label"})
    cfg = text_config(tmp_path)
    assert cfg.student.model.name == "mlp"  # a vector is a set of features, not a sequence: the MLP student


def test_the_readmes_text_config_is_valid(tmp_path):
    """The README's `embed` example (a YAML block, not a command) parses as a config."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "embed:" in b)
    cfg = parse_config(yaml.safe_load(block), "README")
    assert cfg.embed.teacher.dim == 64 and cfg.embed.student.ngrams == 2 and cfg.embed.resources.num_gpus_per_actor == 0.25


@pytest.mark.slow
def test_on_ray_the_encoder_pool_writes_the_bits_of_the_in_process_run(ray_session, tmp_path):
    """Ray Data's actor pool (two encoder actors), an hf model (a tiny random BERT saved here)
    for the student and hashed words for the teachers: the same parts, byte for byte, as the
    in-process run, and the whole pipeline runs on them."""
    pytest.importorskip("transformers")
    texts = write_texts(tmp_path / "t.parquet")
    model = encoders.save_random_bert(str(tmp_path / "bert"), WORDS, hidden=16, layers=1, heads=2)
    student = {"kind": "hf", "path": model, "batch_size": 16}
    on_ray = text_config(tmp_path, embed={"student": student, "resources": {"num_actors": 2}}, teachers={"epochs": 20},
                         student={"epochs": 3, "model": {"name": "mlp", "width": 32, "depth": 2}})
    s = run_pipeline(on_ray, until="report")
    here = text_config(tmp_path / "here", embed={"student": student}, data={"path": str(tmp_path / "t.parquet")})
    h = run_pipeline(here, until="embed", executor=InProcess())
    for role in ("student", "teacher"):
        a, b = s.embed.dirs[role], h.embed.dirs[role]
        assert a.name == b.name
        assert [p.read_bytes() for p in sorted((a / "parts").glob("*"))] == [p.read_bytes() for p in sorted((b / "parts").glob("*"))]
    x = split_rows(s.data)["test"]
    cfg = EncoderConfig(**student)
    # recomputed in other batches: padding differs, so equal to float precision, not bitwise
    np.testing.assert_allclose(x[1], encoders.build(cfg).encode([texts[i] for i in x[0]]), rtol=1e-4, atol=1e-5)
    assert s.results is not None and (s.data.dir.parent.parent / "results.json").is_file()
