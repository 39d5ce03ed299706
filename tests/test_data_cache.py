"""The per-language corpus cache: top-up, skip, count-only, overwrite, crash safety."""

from __future__ import annotations

import json

import pytest

from ggufopt_ray.data.cache import CorpusCache, collect_corpus, default_cache_dir
from ggufopt_ray.data.plugins import DataSource, make_source
from ggufopt_ray.errors import UserError


class Numbered(DataSource):
    """Record i of language L has the text "L-i"; counts every record it hands out."""

    def __init__(self, source=None, *, total=100, fail_at=None, **options):
        super().__init__(source, **options)
        self.total, self.fail_at, self.served = total, fail_at, 0

    def load_records(self, lang, count, skip=0):
        for i in range(skip, min(skip + count, self.total)):
            if i == self.fail_at:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C during a download
            self.served += 1
            yield {"text": f"{lang}-{i}"}


def numbers(cache, lang):
    return [s.index for s in cache.read(lang)]


def test_top_up_fetches_only_what_is_missing(tmp_path):
    source = Numbered()
    cache = CorpusCache(tmp_path, source)
    assert cache.count("en") == 0
    update = cache.top_up("en", 10)
    assert (update.before, update.fetched, update.after, update.start) == (0, 10, 10, 0)
    assert source.served == 10
    assert cache.top_up("en", 10).fetched == 0 and source.served == 10
    update = cache.top_up("en", 25)
    assert (update.before, update.fetched, update.after, update.start) == (10, 15, 25, 10)
    assert numbers(cache, "en") == list(range(25))
    assert cache.texts("en", 3) == ["en-0", "en-1", "en-2"]
    assert source.served == 25  # nothing fetched twice
    assert not list(tmp_path.rglob("*.partial"))


def test_skip_adds_new_data_without_duplicates(tmp_path):
    cache = CorpusCache(tmp_path, Numbered())
    cache.top_up("en", 5, skip=3)
    assert numbers(cache, "en") == [3, 4, 5, 6, 7]
    cache.top_up("en", 8, skip=50)  # add later data from further into the source
    assert numbers(cache, "en") == [3, 4, 5, 6, 7, 50, 51, 52]
    cache.top_up("en", 10, skip=0)  # a lower skip never goes back before what is cached
    assert numbers(cache, "en") == [3, 4, 5, 6, 7, 50, 51, 52, 53, 54]
    texts = cache.texts("en")
    assert len(texts) == len(set(texts))


def test_overwrite_really_replaces(tmp_path):
    cache = CorpusCache(tmp_path, Numbered())
    cache.top_up("en", 10)
    update = cache.top_up("en", 10, skip=20, overwrite=True)  # the original would have fetched 0
    assert (update.before, update.fetched, update.after) == (10, 10, 10)
    assert numbers(cache, "en") == list(range(20, 30))
    cache.top_up("en", 4, overwrite=True)
    assert numbers(cache, "en") == [0, 1, 2, 3]


def test_exhausted_source_and_empty_source(tmp_path):
    cache = CorpusCache(tmp_path, Numbered(total=6))
    update = cache.top_up("en", 10)
    assert update.after == 6 and update.exhausted
    with pytest.raises(UserError, match="no samples for language 'en' from record 50"):
        cache.top_up("en", 5, skip=50, overwrite=True)
    assert cache.count("en") == 6  # a failed overwrite leaves the cache as it was
    with pytest.raises(UserError, match="has no samples for language 'de'"):
        collect_corpus(Numbered(total=0), ["de"], 5, cache_dir=tmp_path)
    assert not (tmp_path / Numbered(total=0).cache_key() / "de.jsonl").exists()


def test_interrupted_fetch_never_corrupts_the_cache(tmp_path):
    cache = CorpusCache(tmp_path, Numbered())
    cache.top_up("en", 5)
    before = cache.path("en").read_bytes()
    interrupted = CorpusCache(tmp_path, Numbered(fail_at=8))
    with pytest.raises(KeyboardInterrupt):
        interrupted.top_up("en", 20)
    assert cache.path("en").read_bytes() == before  # nothing half-written
    assert not list(tmp_path.rglob("*.partial"))
    # with periodic commits, what was committed before the interruption is kept, and a rerun resumes
    interrupted = CorpusCache(tmp_path, Numbered(fail_at=13))
    with pytest.raises(KeyboardInterrupt):
        interrupted.top_up("en", 20, commit_every=4)
    assert numbers(cache, "en") == list(range(13))
    resumed = Numbered()
    CorpusCache(tmp_path, resumed).top_up("en", 20)
    assert numbers(cache, "en") == list(range(20)) and resumed.served == 7
    for line in cache.path("en").read_text().splitlines():
        json.loads(line)


def test_a_missing_field_mid_fetch_leaves_no_partial_cache(tmp_path):
    source = Numbered(text_field="body")
    with pytest.raises(UserError, match="no field 'body'"):
        collect_corpus(source, ["en"], 5, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("*.partial"))


def test_damaged_cache_file_is_a_user_error(tmp_path):
    cache = CorpusCache(tmp_path, Numbered())
    cache.top_up("en", 3)
    with open(cache.path("en"), "a") as fh:
        fh.write('{"i": 3, "te')
    with pytest.raises(UserError, match=r"damaged at line 4.*--overwrite"):
        cache.read("en")


def test_cache_is_keyed_by_source_and_never_in_the_cwd(tmp_path, monkeypatch):
    a = CorpusCache(tmp_path, make_source("local", files="a/{lang}.txt"))
    b = CorpusCache(tmp_path, make_source("local", files="a/{lang}.txt", text_field="body"))
    c = CorpusCache(tmp_path, make_source("hf", source="some/dataset", config="x_{lang}"))
    assert len({a.dir, b.dir, c.dir}) == 3
    assert c.dir.name.startswith("hf-dataset-") and a.dir.name.startswith("local-")
    monkeypatch.setenv("GGUFOPT_CACHE_DIR", str(tmp_path / "g"))
    assert default_cache_dir() == tmp_path / "g" / "corpus"
    monkeypatch.delenv("GGUFOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "ggufopt_ray" / "corpus"


def test_collect_corpus_with_and_without_cache(tmp_path):
    direct = collect_corpus(Numbered(), ["en", "de"], 4, skip=2)
    assert direct.texts == {"en": ["en-2", "en-3", "en-4", "en-5"], "de": ["de-2", "de-3", "de-4", "de-5"]}
    cached = collect_corpus(Numbered(), ["en", "de"], 4, skip=2, cache_dir=tmp_path)
    assert cached.texts == direct.texts
    smaller = collect_corpus(Numbered(), ["en"], 2, cache_dir=tmp_path)  # uses the first 2 cached
    assert smaller.texts == {"en": ["en-2", "en-3"]} and smaller.updates["en"].fetched == 0
    with pytest.raises(UserError, match="--langs"):
        collect_corpus(Numbered(), None, 4)
