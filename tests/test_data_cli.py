"""``ggufopt dataset``: happy paths on every local format, and bad input as one-line errors."""

from __future__ import annotations

import json

import pytest

from ggufopt_ray.cli import main
from ggufopt_ray.data.chunks import load_chunks

PLUGIN = '''
from ggufopt_ray.data.plugins import DataSource

class Sentences(DataSource):
    def load_records(self, lang, count, skip=0):
        for i in range(skip, min(skip + count, int(self.options.get("total", 40)))):
            yield {"payload": {"body": f"{lang} sentence number {i} " + "word " * (i % 17)}}
'''


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys, *args):
    code = main(["dataset", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "|" not in line]  # no tqdm bars
    assert len(lines) == 1, err
    assert lines[0].startswith("ggufopt dataset: error: ") and needle in lines[0], lines[0]


def assert_no_output(tmp_path):
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix in (".parquet", ".partial", ".jsonl")
                 and "src" not in p.relative_to(tmp_path).parts]
    assert not leftovers, leftovers


@pytest.fixture()
def files(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "en.txt").write_text("\n\n".join(f"English paragraph {i}. " + "Some more words here. " * (i % 9)
                                          for i in range(60)))
    records = [{"meta": {"src": f"def f{i}(x):\n    return x * {i}\n"}} for i in range(60)]
    (d / "code.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return d


def test_builtin_default_corpus(capsys, tmp_path, tiny_model):
    out = tmp_path / "out" / "chunks.parquet"
    args = ["--model", tiny_model, "--chunk-size", 256, "--calibration-chunks", 8,
            "--evaluation-chunks", 6, "--output", out, "--cache-dir", tmp_path / "cache"]
    code, stdout, err = run(capsys, *args, "--seed", 5)
    assert code == 0, err
    assert "fingerprint" in stdout and "en: evaluation 2 chunks" in err and "de: evaluation 2 chunks" in err
    ev = load_chunks(out, "evaluation", n_ctx=256)
    assert len(ev) == 6 and [ev.langs.count(lang) for lang in ("code", "de", "en")] == [2, 2, 2]
    code, stdout2, err = run(capsys, *args, "--seed", 5)
    assert code == 0 and "kept it" in err and stdout2 == stdout
    code, stdout3, _ = run(capsys, *args, "--seed", 6)
    assert code == 0 and stdout3.split()[2] != stdout.split()[2]


def test_local_files_cache_top_up_and_count_only(capsys, tmp_path, files):
    cache = tmp_path / "cache"
    src = ["--files", f"en={files / 'en.txt'}", "--files", f"code={files / 'code.jsonl'}",
           "--text-field", "meta.src", "--cache-dir", cache]
    # en is plain text: its records are strings, so the text field does not apply to them
    code, out, err = run(capsys, *src, "--count-only")
    assert code == 0 and out.split() == ["en", "0", "code", "0"]
    code, _, err = run(capsys, *src, "--samples-per-lang", 10)
    assert code == 0 and "en: 10 cached (+10 from record 0)" in err
    code, _, err = run(capsys, *src, "--samples-per-lang", 25, "--skip", 40)
    assert code == 0 and "+15 from record 40" in err
    code, out, _ = run(capsys, *src, "--count-only")
    assert out.split() == ["en", "25", "code", "25"]
    (cache_file,) = [p for p in cache.rglob("en.jsonl")]
    indices = [json.loads(line)["i"] for line in cache_file.read_text().splitlines()]
    assert indices == list(range(10)) + list(range(40, 55))
    code, _, err = run(capsys, *src, "--samples-per-lang", 5, "--overwrite")
    assert code == 0
    code, out, _ = run(capsys, *src, "--count-only")
    assert out.split() == ["en", "5", "code", "5"]


def test_local_files_to_chunks(capsys, tmp_path, files, tiny_model):
    out = tmp_path / "chunks.parquet"
    code, stdout, err = run(capsys, "--files", f"en={files / 'en.txt'}", f"code={files / 'code.jsonl'}",
                            "--text-field", "meta.src", "--cache-dir", tmp_path / "cache",
                            "--model", tiny_model, "--chunk-size", 64, "--calibration-chunks", 4,
                            "--evaluation-chunks", 4, "--output", out)
    assert code == 0, err
    cal, ev = load_chunks(out, "calibration"), load_chunks(out, "evaluation")
    assert sorted(cal.langs) == sorted(ev.langs) == ["code", "code", "en", "en"]
    # reading the files directly gives the same corpus, so the same chunks
    direct = tmp_path / "direct.parquet"
    code, stdout2, err = run(capsys, "--files", f"en={files / 'en.txt'}", f"code={files / 'code.jsonl'}",
                             "--text-field", "meta.src", "--no-cache", "--model", tiny_model,
                             "--chunk-size", 64, "--calibration-chunks", 4, "--evaluation-chunks", 4,
                             "--output", direct)
    assert code == 0, err
    assert stdout2.split("\t")[1:] == stdout.split("\t")[1:]


def test_hf_local_dataset_to_chunks(capsys, tmp_path, tiny_model):
    import datasets

    for lang in ("en", "de"):
        datasets.Dataset.from_dict({"text": [f"{lang} text sample {i} " + "abc " * i for i in range(30)]}
                                   ).save_to_disk(str(tmp_path / f"hf_{lang}"))
    out = tmp_path / "chunks.parquet"
    code, stdout, err = run(capsys, "--plugin", "hf", "--source", tmp_path / "hf_{lang}",
                            "--langs", "en", "de", "--samples-per-lang", 30,
                            "--cache-dir", tmp_path / "cache", "--model", tiny_model, "--chunk-size", 64,
                            "--calibration-chunks", 3, "--evaluation-chunks", 3, "--output", out)
    assert code == 0, err
    assert load_chunks(out, "evaluation").langs == ["en", "de", "en"]


def test_custom_plugin_file(capsys, tmp_path, tiny_model):
    plugin = tmp_path / "sentences.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "chunks.parquet"
    code, stdout, err = run(capsys, "--plugin-file", plugin, "--plugin-class", "Sentences",
                            "--text-field", "payload.body", "--option", "total=30", "--langs", "xx", "yy",
                            "--samples-per-lang", 30, "--cache-dir", tmp_path / "cache",
                            "--model", tiny_model, "--chunk-size", 32, "--calibration-chunks", 2,
                            "--evaluation-chunks", 2, "--output", out)
    assert code == 0, err
    assert "xx: 30 cached (+30 from record 0)" in err
    assert sorted(load_chunks(out, "calibration").langs) == ["xx", "yy"]


def test_list_plugins(capsys):
    code, out, _ = run(capsys, "--list-plugins")
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == ["builtin", "files", "hf", "local", "oscar"]


def test_unknown_plugin(capsys, tmp_path, tiny_model):
    code, _, err = run(capsys, "--plugin", "nope", "--langs", "en", "--cache-dir", tmp_path / "cache",
                       "--model", tiny_model, "--output", tmp_path / "c.parquet")
    assert_one_line_error(code, err, "unknown data-source plugin 'nope'")
    assert_no_output(tmp_path)


def test_missing_field_path(capsys, tmp_path, files, tiny_model):
    code, _, err = run(capsys, "--files", f"code={files / 'code.jsonl'}", "--text-field", "meta.body",
                       "--cache-dir", tmp_path / "cache", "--model", tiny_model,
                       "--output", tmp_path / "c.parquet")
    assert_one_line_error(code, err, "records have no field 'meta.body' (missing 'body' after meta")
    assert_no_output(tmp_path)


def test_empty_source(capsys, tmp_path, tiny_model):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    code, _, err = run(capsys, "--files", f"en={tmp_path / 'empty.txt'}", "--cache-dir", tmp_path / "cache",
                       "--model", tiny_model, "--output", tmp_path / "c.parquet")
    assert_one_line_error(code, err, "has no samples for language 'en'")
    assert_no_output(tmp_path)
    code, _, err = run(capsys, "--files", str(tmp_path / "none" / "*.txt"), "--cache-dir", tmp_path / "cache")
    assert_one_line_error(code, err, "no files match")


def test_fewer_tokens_than_one_chunk(capsys, tmp_path, tiny_model):
    (tmp_path / "short.txt").write_text("a few words\n\nand a few more\n")
    code, _, err = run(capsys, "--files", f"en={tmp_path / 'short.txt'}", "--cache-dir", tmp_path / "cache",
                       "--model", tiny_model, "--chunk-size", 256, "--calibration-chunks", 0,
                       "--evaluation-chunks", 1, "--output", tmp_path / "c.parquet")
    assert_one_line_error(code, err, "language 'en' has too little text")
    assert not (tmp_path / "c.parquet").exists() and not list(tmp_path.glob("*.partial"))


def test_model_problems_are_found_before_fetching(capsys, tmp_path, tiny_model):
    code, _, err = run(capsys, "--cache-dir", tmp_path / "cache", "--model", tmp_path / "missing.gguf",
                       "--output", tmp_path / "c.parquet")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "--cache-dir", tmp_path / "cache", "--model", tiny_model,
                       "--chunk-size", 4096, "--output", tmp_path / "c.parquet")
    assert_one_line_error(code, err, "do not fit the training context")
    assert_no_output(tmp_path)


@pytest.mark.parametrize("args, needle", [
    (["--output", "x.parquet"], "--output needs --model"),
    (["--samples-per-lang", "0"], "--samples-per-lang must be at least 1"),
    (["--skip", "-1"], "--skip must not be negative"),
    (["--count-only", "--overwrite"], "--count-only only counts"),
    (["--calibration-chunks", "0", "--evaluation-chunks", "0", "--model", "m.gguf", "--output", "x"],
     "at least one chunk"),
    (["--langs", "xx"], "no language 'xx'"),
])
def test_bad_options(capsys, tmp_path, args, needle):
    code, _, err = run(capsys, "--cache-dir", tmp_path / "cache", *args)
    assert_one_line_error(code, err, needle)
