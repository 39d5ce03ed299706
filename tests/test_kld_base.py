"""llama-perplexity's KL-divergence base file: our writer and reader agree, bad files are refused.

The same files are checked against llama-perplexity itself in tests/test_llama_cpp_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggufopt_ray.cli import main
from ggufopt_ray.metrics.encodings import get_encoding
from ggufopt_ray.metrics.kld import log_softmax
from ggufopt_ray.store.llamacpp_kld import read_kld_base, row_width, scored_per_chunk, write_kld_base

N_CTX = 16


def _chunks_and_payloads(n_vocab: int, n_chunks: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    enc = get_encoding("llamacpp_uint16")
    chunks = [rng.integers(0, n_vocab, N_CTX).astype(np.int32) for _ in range(n_chunks)]
    rows = scored_per_chunk(N_CTX)
    payloads = [enc.encode(log_softmax(rng.normal(0, 3, (rows, n_vocab)).astype(np.float32))) for _ in chunks]
    return chunks, payloads


@pytest.mark.parametrize("n_vocab", [1024, 1023])  # an odd vocabulary pads each row to an even count
def test_written_file_reads_back_and_has_llama_cpp_layout(tmp_path, n_vocab):
    chunks, payloads = _chunks_and_payloads(n_vocab, 3)
    path = write_kld_base(tmp_path / "base.kld", N_CTX, n_vocab, chunks, payloads)
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_" and not (tmp_path / "base.kld.partial").exists()
    assert np.frombuffer(raw, "<u4", 1, 8)[0] == N_CTX
    assert list(np.frombuffer(raw, "<i4", 2, 12)) == [n_vocab, 3]
    assert len(raw) == 20 + 4 * N_CTX * 3 + 2 * 3 * scored_per_chunk(N_CTX) * row_width(n_vocab)
    # the first scored row of chunk 0, decoded by hand from the bytes
    row = np.frombuffer(raw, "<u2", row_width(n_vocab), 20 + 4 * N_CTX * 3)
    assert row[:4].view("<f4")[0] == payloads[0]["scale"][0]
    assert row[:4].view("<f4")[1] == payloads[0]["min_log_prob"][0]
    np.testing.assert_array_equal(row[4:4 + n_vocab], payloads[0]["codes"][0])
    kf = read_kld_base(path)
    assert (kf.n_ctx, kf.n_vocab, kf.n_chunk, kf.first) == (N_CTX, n_vocab, 3, N_CTX // 2)
    np.testing.assert_array_equal(kf.tokens, np.stack(chunks))
    for i, p in enumerate(payloads):
        got = kf.payload(i)
        for key in ("codes", "scale", "min_log_prob"):
            np.testing.assert_array_equal(got[key], p[key])


def test_damaged_files_are_refused(tmp_path, capsys):
    chunks, payloads = _chunks_and_payloads(64, 2)
    good = write_kld_base(tmp_path / "good.kld", N_CTX, 64, chunks, payloads)
    (tmp_path / "short.kld").write_bytes(good.read_bytes()[:-10])
    (tmp_path / "other.kld").write_bytes(b"GGUF" + good.read_bytes()[4:])
    for name, needle in [("short.kld", "truncated or damaged"), ("other.kld", "not a llama-perplexity"),
                         ("missing.kld", "does not exist")]:
        rc = main(["kld-base", "import", str(tmp_path / name), "--model", "x.gguf", "-o", str(tmp_path / "s")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "s").exists()


def test_import_then_export_gives_the_same_file(tiny_model, tmp_path, capsys):
    from ggufopt_ray.engine.tokenizer import VocabTokenizer
    from ggufopt_ray.store.baseline import BaselineStore

    with VocabTokenizer(tiny_model) as tok:
        n_vocab, bos = tok.n_vocab, tok.bos_id
    chunks, payloads = _chunks_and_payloads(n_vocab, 3, seed=1)
    for c in chunks:
        c[0] = bos
    src = write_kld_base(tmp_path / "src.kld", N_CTX, n_vocab, chunks, payloads)
    assert main(["kld-base", "import", str(src), "--model", str(tiny_model), "-o", str(tmp_path / "store")]) == 0
    store = BaselineStore.open(tmp_path / "store")
    assert store.header["encoding"] == "llamacpp_uint16" and store.header["first"] == N_CTX // 2
    np.testing.assert_array_equal(store.read_tokens(2), chunks[2])
    assert main(["kld-base", "export", str(tmp_path / "store"), "-o", str(tmp_path / "back.kld")]) == 0
    assert (tmp_path / "back.kld").read_bytes() == src.read_bytes()
    capsys.readouterr()
    rc = main(["kld-base", "export", str(tmp_path / "store"), "-o", str(tmp_path / "back.kld")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["kld-base", "import", str(src), "--model", str(tiny_model), "-o", str(tmp_path / "s2")])
    assert rc == 0 and BaselineStore.open(tmp_path / "s2").baseline_id == store.baseline_id


def test_export_refuses_other_encodings(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["logits", str(tiny_model), "--text-file", str(text), "--ctx", "32", "--encoding", "float16",
                 "-o", str(tmp_path / "f16")]) == 0
    capsys.readouterr()
    rc = main(["kld-base", "export", str(tmp_path / "f16"), "-o", str(tmp_path / "x.kld")])
    err = capsys.readouterr().err
    assert rc == 2 and "llamacpp_uint16" in err and not (tmp_path / "x.kld").exists()


def test_valid_rows_pass_the_payload_check_and_garbage_fails():
    from ggufopt_ray.store.llamacpp_kld import payload_problem

    enc = get_encoding("llamacpp_uint16")
    rng = np.random.default_rng(3)
    v = 1000
    logits = np.stack([np.zeros(v), np.r_[40.0, np.zeros(v - 1)], rng.normal(0, 8, v), rng.normal(0, 0.1, v)])
    good = enc.encode(log_softmax(logits.astype(np.float32)))  # flat, one-hot-like, wide, narrow rows
    assert payload_problem(good, v) is None
    cases = {
        "not finite": {**good, "scale": np.r_[good["scale"][:-1], np.float32(np.nan)]},
        "scale": {**good, "scale": good["scale"] * 3 + 1e-3},
        "min_log_prob": {**good, "min_log_prob": good["min_log_prob"] + 10},
        "sum to": {**good, "codes": rng.integers(0, 65536, good["codes"].shape).astype(np.uint16)},
    }
    for needle, bad in cases.items():
        problem = payload_problem(bad, v)
        assert problem is not None and needle in problem, (needle, problem)


def test_import_of_a_valid_header_with_a_garbage_payload_is_refused(tiny_model, tmp_path, capsys):
    from ggufopt_ray.engine.tokenizer import VocabTokenizer

    with VocabTokenizer(tiny_model) as tok:
        n_vocab = tok.n_vocab
    chunks, payloads = _chunks_and_payloads(n_vocab, 3, seed=2)
    src = write_kld_base(tmp_path / "src.kld", N_CTX, n_vocab, chunks, payloads)
    raw = bytearray(src.read_bytes())
    start = 20 + 4 * N_CTX * 3 + 2 * scored_per_chunk(N_CTX) * row_width(n_vocab)  # chunk 1's rows
    raw[start:] = np.random.default_rng(0).integers(0, 256, len(raw) - start, dtype=np.uint8).tobytes()
    (tmp_path / "garbage.kld").write_bytes(bytes(raw))
    rc = main(["kld-base", "import", str(tmp_path / "garbage.kld"), "--model", str(tiny_model),
               "-o", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "garbage.kld: chunk 1 is not valid log-probabilities" in err and "damaged" in err
    assert not (tmp_path / "store").exists()  # chunk 0 was fine, but no partial store is left
