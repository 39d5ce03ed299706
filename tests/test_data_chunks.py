"""Token chunks: determinism, balance, disjoint sets, splitting, reports, fingerprints, loader.

Most tests use a byte tokenizer (id = byte + 3, BOS = 1) so every chunk can be decoded and
checked against an independent reconstruction; the last ones use the real engine on the tiny
synthetic model.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from ggufopt_ray.data.cache import collect_corpus
from ggufopt_ray.data.chunks import (ChunkParams, Tokenizer, allocation, build_chunks, load_chunks,
                                     read_chunk_metadata, sample_id)
from ggufopt_ray.data.plugins import make_source
from ggufopt_ray.errors import UserError

BOS = 1


def byte_tokenize(text):
    return [b + 3 for b in text.encode("utf-8")]


BYTES = Tokenizer(tokenize=byte_tokenize, vocab_fingerprint="bytes-v1", bos_id=BOS, add_bos=True)
BYTES_NO_BOS = Tokenizer(tokenize=byte_tokenize, vocab_fingerprint="bytes-v1", bos_id=BOS, add_bos=False)


def corpus(n=40, langs=("en", "code", "de"), seed=0):
    """Texts of varied length (5..300 bytes), all distinct; a few are longer than a chunk."""
    rng = random.Random(seed)
    out = {}
    for lang in langs:
        out[lang] = [f"<{lang} {i}> " + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 300)))
                     for i in range(n)]
    return out


def decode(ids):
    """Text of byte-tokenizer ids; BOS reads as NUL."""
    return bytes(0 if int(t) == BOS else int(t) - 3 for t in ids).decode("utf-8")


def test_same_seed_same_chunks_and_fingerprint_other_seed_differs():
    texts = corpus()
    params = ChunkParams(n_ctx=64, n_calibration=9, n_evaluation=6, seed=3)
    a, b = build_chunks(texts, BYTES, params), build_chunks(texts, BYTES, params)
    assert a.fingerprint == b.fingerprint and a.set_fingerprints == b.set_fingerprints
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a.chunks, b.chunks))
    c = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=9, n_evaluation=6, seed=4))
    assert c.fingerprint != a.fingerprint
    assert c.set_fingerprints["evaluation"] != a.set_fingerprints["evaluation"]
    assert any(not np.array_equal(x.tokens, y.tokens) for x, y in zip(a.chunks, c.chunks))
    # every input that determines the chunks is in the fingerprint
    other_vocab = Tokenizer(byte_tokenize, "bytes-v2", BOS, True)
    assert build_chunks(texts, other_vocab, params).fingerprint != a.fingerprint
    changed = dict(texts, en=texts["en"][:-1] + ["<en> changed text"])
    assert build_chunks(changed, BYTES, params).fingerprint != a.fingerprint
    assert build_chunks(texts, BYTES, ChunkParams(72, 9, 6, 3)).fingerprint != a.fingerprint


@pytest.mark.parametrize("n_cal, n_eval", [(9, 6), (10, 7), (0, 5), (4, 0), (1, 1)])
def test_languages_balanced_within_one_chunk(n_cal, n_eval):
    texts = corpus()
    ds = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=n_cal, n_evaluation=n_eval))
    for which, n in (("calibration", n_cal), ("evaluation", n_eval)):
        chunks = ds.set(which)
        assert len(chunks) == n and [c.index for c in chunks] == list(range(n))
        counts = [sum(c.lang == lang for c in chunks) for lang in texts]
        assert max(counts) - min(counts) <= 1, (which, counts)
        for k in range(1, n + 1):  # every prefix of a set is balanced too
            prefix = [sum(c.lang == lang for c in chunks[:k]) for lang in texts]
            assert max(prefix) - min(prefix) <= 1
    both = [sum(c.lang == lang for c in ds.chunks) for lang in texts]
    assert max(both) - min(both) <= 1
    assert allocation(["a", "b", "c"], 7) == {"a": 3, "b": 2, "c": 2}


def test_calibration_and_evaluation_share_no_text_sample():
    texts = corpus(n=30)
    texts["de"] += [texts["en"][0], texts["en"][1]]  # duplicates across languages
    ds = build_chunks(texts, BYTES, ChunkParams(n_ctx=48, n_calibration=12, n_evaluation=12, seed=1))
    used = {which: {sid for c in ds.set(which) for sid in c.sample_ids}
            for which in ("calibration", "evaluation")}
    assert used["calibration"] and used["evaluation"]
    assert not used["calibration"] & used["evaluation"]
    # and no text of one set occurs inside a chunk of the other (decoded, independent of ids)
    by_id = {sample_id(t): t for ts in texts.values() for t in ts}
    eval_text = "".join(decode(c.tokens[1:]) for c in ds.set("evaluation"))
    for sid in used["calibration"]:
        assert by_id[sid] not in eval_text
    assert sum(r.duplicates for r in ds.report) == 2


def test_chunks_are_exact_concatenations_of_whole_samples():
    """Independent reconstruction: strip BOS, and the chunk contents of a language in a set are the
    samples in order, each one complete except the last (whose tail is reported as dropped)."""
    texts = corpus(n=40)
    n_ctx = 50
    ds = build_chunks(texts, BYTES, ChunkParams(n_ctx=n_ctx, n_calibration=9, n_evaluation=9))
    by_id = {sample_id(t): t for ts in texts.values() for t in ts}
    long_samples = 0
    for report in ds.report:
        for which in ("evaluation", "calibration"):
            chunks = [c for c in ds.set(which) if c.lang == report.lang]
            for c in chunks:
                assert c.tokens.dtype == np.int32 and c.tokens.shape == (n_ctx,)
                assert c.tokens[0] == BOS
            content = [int(t) for c in chunks for t in c.tokens[1:]]
            order = list(dict.fromkeys(sid for c in chunks for sid in c.sample_ids))
            stream = []
            for sid in order:
                stream += byte_tokenize(by_id[sid])
                long_samples += len(byte_tokenize(by_id[sid])) > n_ctx - 1
            without_bos = [t for t in content if t != BOS]
            dropped = report.tokens_dropped[which]
            assert without_bos == stream[:len(stream) - dropped]
            assert report.tokens_used[which] == len(without_bos)
            assert report.samples_used[which] >= len(order)
            # BOS only between samples: the number of separators is at most samples - 1 per chunk run
            assert content.count(BOS) <= len(order) - 1
    assert long_samples > 0  # samples longer than a chunk were split, not dropped
    assert sum(r.samples_split for r in ds.report) >= long_samples


def test_report_accounts_for_every_sample():
    texts = corpus(n=25)
    texts["en"] += ["", "   \n"]
    ds = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=6, n_evaluation=3))
    for r in ds.report:
        accounted = sum(r.samples_used.values()) + r.samples_unused + r.empty + r.duplicates
        assert accounted == r.samples == len(texts[r.lang])
    assert ds.report[0].empty == 2


def test_evaluation_set_does_not_depend_on_the_calibration_size():
    texts = corpus(n=60)
    small = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=3, n_evaluation=6))
    big = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=12, n_evaluation=6))
    assert small.set_fingerprints["evaluation"] == big.set_fingerprints["evaluation"]
    assert small.fingerprint != big.fingerprint
    for x, y in zip(small.set("evaluation"), big.set("evaluation")):
        assert np.array_equal(x.tokens, y.tokens)


def test_max_sample_tokens_cuts_long_samples():
    texts = corpus(n=60)
    plain = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=6, n_evaluation=6))
    capped = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=6, n_evaluation=6,
                                                    max_sample_tokens=40))
    assert capped.fingerprint != plain.fingerprint
    by_id = {sample_id(t): t for ts in texts.values() for t in ts}
    for c in capped.chunks:  # only the first 40 tokens of any sample appear
        for piece in decode(c.tokens[1:]).split("\0"):
            assert any(piece in by_id[sid][:40] for sid in c.sample_ids)
    assert sum(r.tokens_truncated for r in capped.report) > 0
    assert sum(sum(r.samples_used.values()) for r in capped.report) > \
        sum(sum(r.samples_used.values()) for r in plain.report)
    with pytest.raises(UserError, match="sample token limit"):
        build_chunks(texts, BYTES, ChunkParams(64, 1, 1, max_sample_tokens=0))


def test_without_bos():
    ds = build_chunks(corpus(), BYTES_NO_BOS, ChunkParams(n_ctx=32, n_calibration=3, n_evaluation=3))
    assert all(BOS not in c.tokens for c in ds.chunks)  # no header, no separator


def test_too_little_text_is_a_user_error():
    tiny = {"en": ["just a few words"], "de": ["ein paar Worte"]}
    with pytest.raises(UserError, match=r"language 'en' has too little text: 1 samples gave 16 tokens, "
                                        r"fewer than the 63 needed"):
        build_chunks(tiny, BYTES, ChunkParams(n_ctx=64, n_calibration=0, n_evaluation=2))
    texts = corpus(n=10)
    with pytest.raises(UserError, match="--samples-per-lang"):
        build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=60, n_evaluation=30))
    with pytest.raises(UserError, match="at least one chunk"):
        build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=0, n_evaluation=0))


def test_write_and_load_round_trip_and_refusals(tmp_path):
    texts = corpus()
    ds = build_chunks(texts, BYTES, ChunkParams(n_ctx=64, n_calibration=5, n_evaluation=4, seed=2))
    path = ds.write(tmp_path / "chunks.parquet")
    assert not list(tmp_path.glob("*.partial"))
    for which in ("evaluation", "calibration"):
        loaded = load_chunks(path, which, fingerprint=ds.set_fingerprints[which],
                             vocab_fingerprint="bytes-v1", n_ctx=64)
        assert loaded.fingerprint == ds.set_fingerprints[which]
        assert loaded.dataset_fingerprint == ds.fingerprint
        expected = ds.set(which)
        assert len(loaded) == len(expected)
        for arr, c in zip(loaded.chunks, expected):
            assert arr.dtype == np.int32 and arr.flags.writeable and np.array_equal(arr, c.tokens)
        assert loaded.langs == [c.lang for c in expected]
        assert loaded.sample_ids == [c.sample_ids for c in expected]
    by_file_fingerprint = load_chunks(path, "evaluation", fingerprint=ds.fingerprint)
    assert by_file_fingerprint.fingerprint == ds.set_fingerprints["evaluation"]
    meta = read_chunk_metadata(path)
    assert meta["params"]["seed"] == 2 and meta["counts"] == {"evaluation": 4, "calibration": 5}
    with pytest.raises(UserError, match="not the expected 0000"):
        load_chunks(path, "evaluation", fingerprint="0000")
    with pytest.raises(UserError, match="for vocabulary bytes-v1, but the model has vocabulary xyz"):
        load_chunks(path, "evaluation", vocab_fingerprint="xyz")
    with pytest.raises(UserError, match="chunks of 64 tokens, not 128"):
        load_chunks(path, "calibration", n_ctx=128)
    with pytest.raises(UserError, match="unknown chunk set"):
        load_chunks(path, "train")
    with pytest.raises(UserError, match="does not exist"):
        load_chunks(tmp_path / "missing.parquet")
    (tmp_path / "other.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        load_chunks(tmp_path / "other.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(UserError, match="not a ggufopt chunks file"):
        load_chunks(tmp_path / "plain.parquet")


# -- with the real engine ------------------------------------------------------------------------

def test_builtin_corpus_on_the_tiny_model(tiny_model, tmp_path):
    from ggufopt_ray.data.build import model_tokenizer, prepare_chunks
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.gguf.inspect import inspect_model

    info = inspect_model(tiny_model)
    params = ChunkParams(n_ctx=256, n_calibration=32, n_evaluation=32, seed=0)
    out = tmp_path / "chunks.parquet"
    first = prepare_chunks(out, model_path=tiny_model, params=params)
    assert not first.reused and first.counts == {"evaluation": 32, "calibration": 32}
    assert first.vocab_fingerprint == info.vocab_fingerprint
    again = prepare_chunks(out, model_path=tiny_model, params=params)
    assert again.reused and again.fingerprint == first.fingerprint
    rebuilt = prepare_chunks(out, model_path=tiny_model, params=params, reuse=False)
    assert rebuilt.fingerprint == first.fingerprint and not rebuilt.reused
    other = prepare_chunks(tmp_path / "seed1.parquet", model_path=tiny_model,
                           params=ChunkParams(256, 32, 32, seed=1))
    assert other.fingerprint != first.fingerprint

    ev = load_chunks(out, "evaluation", vocab_fingerprint=info.vocab_fingerprint, n_ctx=256)
    cal = load_chunks(out, "calibration", vocab_fingerprint=info.vocab_fingerprint, n_ctx=256)
    # the built-in languages in order, 32 chunks dealt in turn: code 11, de 11, en 10
    assert sorted(set(ev.langs)) == ["code", "de", "en"]
    assert [ev.langs.count(lang) for lang in ("code", "de", "en")] == [11, 11, 10]
    assert not {s for ids in ev.sample_ids for s in ids} & {s for ids in cal.sample_ids for s in ids}

    # independent check: the content of the first evaluation chunk is the engine's tokenization of
    # its samples, joined by BOS; and the engine evaluates the chunk unchanged
    texts = collect_corpus(make_source("builtin"), None, 200).texts
    by_id = {sample_id(t): t for ts in texts.values() for t in ts}
    with LogitsEngine(tiny_model, RuntimeSettings(n_ctx=256, n_batch=256, n_ubatch=256)) as engine:
        chunk = ev.chunks[0]
        assert np.array_equal(engine.prepare_chunk(chunk), chunk)
        expected = [engine.bos_id]
        for sid in ev.sample_ids[0]:
            if len(expected) > 1:
                expected.append(engine.bos_id)
            expected += engine.tokenize(by_id[sid]).tolist()
        assert chunk.tolist() == expected[:256]
        logits = engine.logits(chunk)
        assert logits.shape == (256, engine.n_vocab) and np.isfinite(logits).all()
    with model_tokenizer(tiny_model) as tok:
        assert tok.add_bos and tok.bos_id == ev.chunks[0][0]


def test_prepare_chunks_caches_remote_sources_only(tiny_model, tmp_path, monkeypatch):
    import datasets

    from ggufopt_ray.data.build import prepare_chunks

    monkeypatch.setenv("GGUFOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = [f"sample {i}: " + "text " * (i % 13) for i in range(30)]
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "hf_en"))
    (tmp_path / "en.txt").write_text("\n\n".join(lines))
    params = ChunkParams(n_ctx=32, n_calibration=2, n_evaluation=2)
    hf = prepare_chunks(tmp_path / "hf.parquet", model_path=tiny_model, params=params, langs=["en"],
                        source=make_source("hf", source=str(tmp_path / "hf_{lang}")), samples_per_lang=30)
    assert [p.name for p in (tmp_path / "cache" / "corpus").rglob("*.jsonl")] == ["en.jsonl"]
    local = prepare_chunks(tmp_path / "local.parquet", model_path=tiny_model, params=params, langs=["en"],
                           source=make_source("local", files=str(tmp_path / "{lang}.txt")),
                           samples_per_lang=30)
    assert len(list((tmp_path / "cache" / "corpus").iterdir())) == 1  # local files were read directly
    assert local.fingerprint == hf.fingerprint  # same texts, same tokenizer, same chunks
