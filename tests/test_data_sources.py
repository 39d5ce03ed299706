"""Data sources: field paths, plugin lookup (name, entry point, file), local files, HF datasets.

Everything is local: HF-format datasets are written with ``save_to_disk`` or as Parquet/JSON data
files, and ``datasets`` runs offline.
"""

from __future__ import annotations

import gzip
import json
import textwrap

import pytest

from ggufopt_ray.data import plugins
from ggufopt_ray.data.builtin_corpus import GENERATORS, HANDWRITTEN, generate
from ggufopt_ray.data.local import BUILTIN_DIR, builtin_languages, split_documents
from ggufopt_ray.data.plugins import (DataSource, extract_field, get_source_class,
                                      load_source_class_from_file, make_source)
from ggufopt_ray.errors import UserError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def texts(source, lang, count=1000, skip=0):
    return list(source.load_texts(lang, count, skip))


# -- field paths ---------------------------------------------------------------------------------

def test_extract_field_dotted_paths_and_list_indices():
    record = {"text": "top", "meta": {"body": "nested", "turns": [{"content": "a"}, {"content": "b"}]},
              "none": None}
    assert extract_field(record, "text") == "top"
    assert extract_field(record, "meta.body") == "nested"
    assert extract_field(record, "meta.turns.1.content") == "b"
    assert extract_field(record, "meta.turns.-1.content") == "b"
    assert extract_field(record, "none") == ""
    assert extract_field("plain string", "anything") == "plain string"


@pytest.mark.parametrize("path, needle", [
    ("body", "missing 'body' after the top level"),
    ("meta.title", "missing 'title' after meta"),
    ("meta.turns.5.content", "list of 2 items"),
    ("meta.turns.x", "not an index"),
    ("text.more", "is a str"),
    ("meta", "holds a dict, not text"),
])
def test_extract_field_missing_path_is_a_one_line_user_error(path, needle):
    record = {"text": "t", "meta": {"body": "b", "turns": [{"content": "a"}, {"content": "b"}]}}
    with pytest.raises(UserError) as err:
        extract_field(record, path)
    msg = str(err.value)
    assert needle in msg and "--text-field" in msg and "\n" not in msg


# -- plugin lookup -------------------------------------------------------------------------------

def test_builtin_names_are_registered():
    names = plugins.registered_sources()
    assert {"builtin", "local", "files", "hf", "oscar"} <= set(names)
    assert get_source_class("files") is get_source_class("local")
    assert get_source_class("files").__name__ == "LocalFilesSource"


def test_unknown_plugin_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown data-source plugin 'nope'.*builtin.*files.*hf"):
        get_source_class("nope")


PLUGIN_FILE = textwrap.dedent('''
    from ggufopt_ray.data.plugins import DataSource

    class CountingSource(DataSource):
        """Record i of language L is {"body": {"text": "L record i"}}; 50 records per language."""

        def __init__(self, source=None, *, text_field="body.text", total=50, **options):
            super().__init__(source, text_field=text_field, **options)
            self.total = int(total)

        def load_records(self, lang, count, skip=0):
            for i in range(skip, min(skip + count, self.total)):
                yield {"body": {"text": f"{lang} record {i}"}}

    class Helper:
        pass
''')


@pytest.fixture()
def plugin_file(tmp_path):
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN_FILE)
    return path


def test_custom_plugin_from_a_file(plugin_file):
    cls = load_source_class_from_file(plugin_file, "CountingSource")
    assert issubclass(cls, DataSource)
    # without a class name the only DataSource subclass in the file is taken
    assert load_source_class_from_file(plugin_file).__name__ == "CountingSource"
    source = make_source(plugin_file=plugin_file, plugin_class="CountingSource", total="7")
    assert texts(source, "de", 3, skip=2) == ["de record 2", "de record 3", "de record 4"]
    assert len(texts(source, "de")) == 7


def test_bad_plugin_files(tmp_path, plugin_file):
    with pytest.raises(UserError, match="does not exist"):
        load_source_class_from_file(tmp_path / "missing.py")
    with pytest.raises(UserError, match="defines no class 'Nope'"):
        load_source_class_from_file(plugin_file, "Nope")
    with pytest.raises(UserError, match="not a subclass"):
        load_source_class_from_file(plugin_file, "Helper")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UserError, match="failed to import: ModuleNotFoundError"):
        load_source_class_from_file(broken)
    strict = tmp_path / "strict.py"
    strict.write_text("from ggufopt_ray.data.plugins import DataSource\n"
                      "class Strict(DataSource):\n"
                      "    def __init__(self, source=None):\n"
                      "        super().__init__(source)\n"
                      "    def load_records(self, lang, count, skip=0):\n"
                      "        return []\n")
    with pytest.raises(UserError, match="Strict does not accept these options"):
        make_source(plugin_file=strict, text_field="body")


def test_plugin_from_an_installed_entry_point(tmp_path, monkeypatch):
    (tmp_path / "ep_plugin_mod.py").write_text(PLUGIN_FILE)
    dist = tmp_path / "ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{plugins.ENTRY_POINT_GROUP}]\ncounting = ep_plugin_mod:CountingSource\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "counting" in plugins.registered_sources()
    source = make_source("counting")
    assert texts(source, "fr", 2) == ["fr record 0", "fr record 1"]


# -- local files ---------------------------------------------------------------------------------

def test_split_documents():
    assert split_documents("a\nb\n\nc\n\n\n\nd\n") == ["a\nb", "c", "d"]
    assert split_documents("a\n\nstill a\n\x1e\nb\n\x1e\n") == ["a\n\nstill a\n", "b\n"]
    assert split_documents("x\ny\n", "line") == ["x", "y"]
    assert split_documents("x\n\ny\n", "file") == ["x\n\ny\n"]


@pytest.fixture()
def local_corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "en").mkdir(parents=True)
    (d / "en" / "a.txt").write_text("en one\n\nen two\n\nen three\n")
    (d / "en" / "b.txt.gz").write_bytes(gzip.compress("en four\x1e\nen five\x1e\n".encode()))
    (d / "de").mkdir()
    (d / "de" / "a.jsonl").write_text("\n".join(json.dumps({"doc": {"text": f"de {i}"}})
                                               for i in range(6)) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "fr").mkdir()
    pq.write_table(pa.table({"doc": [{"text": f"fr {i}"} for i in range(5)]}), d / "fr" / "a.parquet")
    (d / "es").mkdir()
    (d / "es" / "a.json").write_text(json.dumps([{"doc": {"text": f"es {i}"}} for i in range(4)]))
    return d


def test_local_text_files_with_lang_pattern_and_gzip(local_corpus):
    source = make_source("local", files=str(local_corpus / "{lang}" / "*"))
    assert texts(source, "en") == ["en one", "en two", "en three", "en four", "en five"]
    assert texts(source, "en", 2, skip=2) == ["en three", "en four"]
    assert texts(source, "en", 5, skip=10) == []


@pytest.mark.parametrize("lang, n", [("de", 6), ("fr", 5), ("es", 4)])
def test_local_jsonl_parquet_json_with_field_path(local_corpus, lang, n):
    source = make_source("local", files=[f"{lang}={local_corpus / lang / '*'}"], text_field="doc.text")
    assert source.default_langs == (lang,)
    assert texts(source, lang) == [f"{lang} {i}" for i in range(n)]
    assert texts(source, lang, 2, skip=1) == [f"{lang} 1", f"{lang} 2"]


def test_local_files_errors(local_corpus, tmp_path):
    with pytest.raises(UserError, match="no files match"):
        texts(make_source("local", files=str(tmp_path / "nothing" / "*.txt")), "all")
    with pytest.raises(UserError, match="no files are given for language 'it'"):
        texts(make_source("local", files=[f"en={local_corpus / 'en' / '*'}"]), "it")
    with pytest.raises(UserError, match="records have no field 'text'"):
        texts(make_source("local", files=str(local_corpus / "{lang}" / "*")), "de")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not valid JSON"):
        texts(make_source("local", files=str(bad)), "all")
    with pytest.raises(UserError, match="mixes LANG=GLOB"):
        make_source("local", files=["en=a/*.txt", "b/*.txt"])


def test_shared_models_corpus_format(tmp_path):
    # ../shared/models/corpus: documents end with a line holding only "\x1e"
    path = tmp_path / "eval.txt"
    path.write_text("def f():\n\n    return 1\n\x1e\n# Title\n\nprose\n\x1e\n")
    assert texts(make_source("local", files=str(path)), "all") == ["def f():\n\n    return 1\n",
                                                                   "# Title\n\nprose\n"]


def test_builtin_corpus_is_shipped_and_reproducible():
    assert builtin_languages() == ("code", "de", "en")
    assert set(GENERATORS) | set(HANDWRITTEN) == set(builtin_languages())
    for lang in GENERATORS:
        assert (BUILTIN_DIR / f"{lang}.txt").read_text(encoding="utf-8") == generate(lang)
    source = make_source("builtin")
    assert source.default_langs == ("code", "de", "en")
    en = texts(source, "en")
    assert len(en) == 60 and len(set(en)) == 60
    # the hand-written German: separator-terminated UTF-8 documents, all different, really German
    raw = (BUILTIN_DIR / "de.txt").read_text(encoding="utf-8")
    assert raw.endswith("\n\x1e\n") and "\r" not in raw
    de = texts(source, "de")
    assert len(de) == raw.count("\x1e\n") == 23 and len(set(de)) == 23
    assert all(300 < len(d) < 2000 and d.strip() == d.rstrip("\n") for d in de)
    assert sum(map(len, de)) > 15000 and all(c in raw for c in "äöüß„“")
    words = " ".join(de).split()
    assert sum(w in ("und", "die", "der", "das") for w in words) > 0.05 * len(words)
    with pytest.raises(UserError, match="no language 'xx'"):
        texts(source, "xx")


# -- Hugging Face datasets (local only) ----------------------------------------------------------

@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    import datasets

    d = tmp_path_factory.mktemp("hf")
    rows = {"lang": [], "content": []}
    for lang in ("en", "de"):
        for i in range(8):
            rows["lang"].append(lang)
            rows["content"].append({"text": f"{lang} hf {i}"})
    datasets.Dataset.from_dict(rows).save_to_disk(str(d / "multi"))
    for lang in ("en", "de"):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"text": [f"{lang} per-lang {i}" for i in range(5)]})}).save_to_disk(str(d / f"ds_{lang}"))
    return d


def test_hf_save_to_disk_per_language_path(hf_saved):
    source = make_source("hf", source=str(hf_saved / "ds_{lang}"))
    assert texts(source, "de") == [f"de per-lang {i}" for i in range(5)]
    assert texts(source, "en", 2, skip=3) == ["en per-lang 3", "en per-lang 4"]
    streaming = make_source("hf", source=str(hf_saved / "ds_{lang}"), streaming=True)
    assert texts(streaming, "en", 2, skip=1) == ["en per-lang 1", "en per-lang 2"]
    with pytest.raises(UserError, match="not 'test'"):
        texts(make_source("hf", source=str(hf_saved / "ds_{lang}"), split="test"), "en")


def test_hf_one_multilingual_dataset_filtered_by_lang_field(hf_saved):
    source = make_source("hf", source=str(hf_saved / "multi"), lang_field="lang", text_field="content.text")
    assert texts(source, "de", 3, skip=2) == ["de hf 2", "de hf 3", "de hf 4"]
    with pytest.raises(UserError, match="no field 'text'"):
        texts(make_source("hf", source=str(hf_saved / "multi")), "en")


def test_hf_load_dataset_from_local_data_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for lang in ("en", "de"):
        pq.write_table(pa.table({"text": [f"{lang} pq {i}" for i in range(6)]}), tmp_path / f"{lang}.parquet")
    for streaming in (False, True):
        source = make_source("hf", source="parquet", data_files=str(tmp_path / "{lang}.parquet"),
                             streaming=streaming, hf_cache_dir=str(tmp_path / "hf_cache"))
        assert texts(source, "de", 3, skip=1) == ["de pq 1", "de pq 2", "de pq 3"]
    with pytest.raises(UserError, match="cannot open dataset 'parquet'"):
        texts(make_source("hf", source="parquet", data_files=str(tmp_path / "none_{lang}.parquet"),
                          hf_cache_dir=str(tmp_path / "hf_cache")), "en")


def test_oscar_preset_streams_the_per_language_config(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        lang = kwargs["name"].rsplit("_", 1)[-1]
        return datasets.Dataset.from_dict({"id": list(range(10)),
                                           "text": [f"{lang} oscar {i}" for i in range(10)]}
                                          ).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = make_source("oscar")
    assert texts(source, "ca", 2, skip=4) == ["ca oscar 4", "ca oscar 5"]
    path, kwargs = calls[0]
    assert path == "oscar-corpus/oscar"
    assert kwargs["name"] == "unshuffled_deduplicated_ca"
    assert kwargs["split"] == "train" and kwargs["streaming"] is True
