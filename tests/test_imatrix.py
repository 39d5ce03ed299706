"""Importance matrices: collected values against numpy, growth by chunks, files, CLI."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ggufopt_ray.cli import main
from ggufopt_ray.engine.imatrix import Imatrix, collect_imatrix, load_imatrix
from ggufopt_ray.engine.quantize import quantize_model
from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.inspect import open_reader

BOS = 1  # the synthetic SPM vocabulary's <s>


def _chunks(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1024, size=length).astype(np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def chunks():
    return _chunks(4, 48, seed=3)


@pytest.fixture(scope="module")
def collected(tiny_model, chunks):
    return collect_imatrix(tiny_model, chunks, n_threads=1, dataset_name="random-tokens")


def _weights(path):
    reader = open_reader(path)
    eps = float(reader.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    return {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}, eps


def test_first_layer_projection_equals_numpy(tiny_model, chunks, collected):
    """Input of blk.0.attn_q/k/v = RMSNorm(token embedding) * attn_norm, with BOS at position 0."""
    w, eps = _weights(tiny_model)
    expected = np.zeros(w["token_embd.weight"].shape[1])
    n_tokens = 0
    for c in chunks:
        ids = c.copy()
        ids[0] = BOS  # llama-imatrix replaces each chunk's first token by BOS
        x = w["token_embd.weight"][ids]
        x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * w["blk.0.attn_norm.weight"]
        expected += (x * x).sum(axis=0)
        n_tokens += len(ids)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        e = collected.entries[name]
        assert e.sums.shape == (1, 256) and e.sums.dtype == np.float32
        np.testing.assert_allclose(e.sums[0], expected, rtol=1e-5)
        assert e.counts.tolist() == [n_tokens]
    # the mean llama.cpp quantizes with
    np.testing.assert_allclose(collected.entries["blk.0.attn_q.weight"].importance(), expected / n_tokens,
                               rtol=1e-5)


def test_every_block_matrix_sees_every_token(collected, chunks):
    n_tokens = sum(len(c) for c in chunks)
    names = {f"blk.{i}.{t}.weight" for i in range(2)
             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(collected.entries) == names  # output.weight only with process_output
    for name, e in collected.entries.items():
        assert e.counts.tolist() == [n_tokens], name
        assert e.n_cols == (768 if "ffn_down" in name else 256)
        assert np.isfinite(e.sums).all() and (e.sums > 0).all()
    assert collected.chunk_count == len(chunks) and collected.chunk_size == 48
    assert collected.datasets == ["random-tokens"]


def test_process_output_collects_output_weight(tiny_model, chunks):
    im = collect_imatrix(tiny_model, chunks[:1], n_threads=1, process_output=True)
    assert im.entries["output.weight"].counts.tolist() == [48]


def test_growing_by_chunks_equals_all_at_once(tiny_model, chunks, collected, tmp_path):
    first = collect_imatrix(tiny_model, chunks[:1], n_threads=1, dataset_name="random-tokens")
    first.save(tmp_path / "grow.gguf")
    second = collect_imatrix(tiny_model, chunks[1:3], n_threads=1, base=load_imatrix(tmp_path / "grow.gguf"),
                             dataset_name="random-tokens")
    second.save(tmp_path / "grow.gguf")
    grown = collect_imatrix(tiny_model, chunks[3:], n_threads=1, base=Imatrix.load(tmp_path / "grow.gguf"))
    assert set(grown.entries) == set(collected.entries)
    for name, e in collected.entries.items():
        assert np.array_equal(grown.entries[name].sums, e.sums), name  # bit for bit
        assert np.array_equal(grown.entries[name].counts, e.counts)
    assert grown.chunk_count == collected.chunk_count == 4
    assert grown.dataset_fingerprint == collected.dataset_fingerprint
    assert grown.datasets == collected.datasets
    assert grown.hash() == collected.hash()
    # the base passed in is not modified
    assert first.chunk_count == 1


def test_hash_tracks_content(collected):
    other = collected.copy()
    assert other.hash() == collected.hash()
    other.entries["blk.1.ffn_up.weight"].sums[0, 0] += 1.0
    assert other.hash() != collected.hash()


def test_gguf_file_round_trips_in_llama_cpp_layout(collected, tmp_path):
    import gguf

    path = collected.save(tmp_path / "im.gguf")
    assert not list(tmp_path.glob("*.partial"))
    back = Imatrix.load(path)
    for name, e in collected.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums)
        assert np.array_equal(back.entries[name].counts, e.counts)
    assert (back.chunk_count, back.chunk_size, back.datasets, back.dataset_fingerprint) == (
        collected.chunk_count, collected.chunk_size, collected.datasets, collected.dataset_fingerprint)
    assert back.hash() == collected.hash()
    # what llama.cpp's load_imatrix requires: the three imatrix keys with their types, and for
    # every weight an F32 '<name>.in_sum2' of ggml shape [n_cols, n_mat] and '<name>.counts' [1, n_mat]
    reader = open_reader(path)
    f = reader.fields
    assert f["general.type"].contents() == "imatrix"
    assert "general.architecture" not in f
    assert f["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert f["imatrix.datasets"].contents() == ["random-tokens"]
    assert f["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert f["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(collected.entries)
    for name, e in collected.entries.items():
        s, c = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        assert s.tensor_type == c.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(d) for d in s.shape] == [e.n_cols, 1]
        assert [int(d) for d in c.shape] == [1, 1]
        assert float(np.array(c.data).reshape(-1)[0]) == float(e.counts[0])


def test_legacy_dat_round_trips_the_importance(collected, tmp_path):
    path = collected.save(tmp_path / "im.dat")
    with open(path, "rb") as fh:
        assert struct.unpack("<i", fh.read(4))[0] == len(collected.entries)
    back = load_imatrix(path, legacy_chunk_size=collected.chunk_size)
    assert set(back.entries) == set(collected.entries)
    for name, e in collected.entries.items():
        np.testing.assert_allclose(back.entries[name].importance(), e.importance(), rtol=1e-6)
    assert back.datasets == ["random-tokens"]
    assert back.chunk_count == collected.chunk_count


def test_saved_file_is_accepted_by_quantize(tiny_model, collected, tmp_path):
    path = collected.save(tmp_path / "im.gguf")
    dat = collected.save(tmp_path / "im.dat")
    from_file = quantize_model(tiny_model, "IQ4_XS", tmp_path / "f.gguf", imatrix=path, threads=1)
    in_memory = quantize_model(tiny_model, "IQ4_XS", tmp_path / "m.gguf", imatrix=collected, threads=1)
    from_dat = quantize_model(tiny_model, "IQ4_XS", tmp_path / "d.gguf", imatrix=dat, threads=1)
    data = {}
    for r in (from_file, in_memory, from_dat):
        data[r.path] = {t.name: np.array(t.data) for t in open_reader(r.path).tensors}
    a, b, c = data.values()
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # same importance -> identical quantization
    f = open_reader(from_file.path).fields
    assert f["quantize.imatrix.file"].contents() == str(path)
    assert f["quantize.imatrix.dataset"].contents() == "random-tokens"
    assert open_reader(from_dat.path).fields["quantize.imatrix.file"].contents() == str(dat)


def test_empty_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="empty"):
        Imatrix().save(tmp_path / "x.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00")
    with pytest.raises(UserError, match="neither a GGUF imatrix nor a readable legacy"):
        load_imatrix(tmp_path / "junk.dat")
    with pytest.raises(UserError, match="does not exist"):
        load_imatrix(tmp_path / "missing.gguf")


def _one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ggufopt imatrix: error:") and needle in err[0], err


def test_cli_collects_appends_and_refuses_bad_input(tiny_model, tmp_path, capsys):
    text = tmp_path / "cal.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "im.gguf"
    base = ["imatrix", str(tiny_model), "--text-file", str(text), "--ctx", "64", "--threads", "1",
            "--output", str(out)]
    assert main(base + ["--chunks", "2"]) == 0
    captured = capsys.readouterr()
    assert "2 chunks of 64 tokens" in captured.out and "imatrix" in captured.err  # progress bar
    assert Imatrix.load(out).chunk_count == 2
    _one_line_error(capsys, base + ["--chunks", "2"], "exists; pass --append")
    assert main(base + ["--append", "--skip-chunks", "2", "--chunks", "1"]) == 0
    capsys.readouterr()
    grown = Imatrix.load(out)
    assert grown.chunk_count == 3
    assert grown.entries["blk.0.attn_q.weight"].counts.tolist() == [192]
    assert grown.datasets == [str(text)]
    _one_line_error(capsys, ["imatrix", str(tiny_model), "--text-file", str(tmp_path / "nope.txt"),
                             "--output", str(tmp_path / "n.gguf")], "does not exist")
    _one_line_error(capsys, ["imatrix", str(tiny_model), "--text-file", str(text), "--ctx", "4096",
                             "--output", str(tmp_path / "n.gguf")], "training context")
    _one_line_error(capsys, base[:-1] + [str(tmp_path / "n.gguf"), "--skip-chunks", "999"], "no chunks left")


def test_cli_chunks_file(tiny_model, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunks = _chunks(2, 32, seed=9)
    pq.write_table(pa.table({"tokens": [c.tolist() for c in chunks]}), tmp_path / "c.parquet")
    out = tmp_path / "im.gguf"
    assert main(["imatrix", str(tiny_model), "--chunks-file", str(tmp_path / "c.parquet"), "--ctx", "32",
                 "--threads", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    direct = collect_imatrix(tiny_model, chunks, n_ctx=32, n_threads=1)
    assert Imatrix.load(out).hash() == direct.hash()
    _one_line_error(capsys, ["imatrix", str(tiny_model), "--chunks-file", str(tmp_path / "c.parquet"),
                             "--ctx", "16", "--output", str(tmp_path / "x.gguf")], "longer than --ctx")


def test_merge_equals_collecting_together(tiny_model, chunks, collected):
    a = collect_imatrix(tiny_model, chunks[:2], n_threads=1, dataset_name="random-tokens")
    b = collect_imatrix(tiny_model, chunks[2:], n_threads=1, dataset_name="random-tokens")
    merged = a.merge(b)
    for name, e in collected.entries.items():
        np.testing.assert_allclose(merged.entries[name].sums, e.sums, rtol=1e-6)
        assert np.array_equal(merged.entries[name].counts, e.counts)
    assert merged.chunk_count == 4 and merged.datasets == ["random-tokens"]


def _write_moe_model(path, n_expert=4, n_used=2, d=256, ff=256, n_vocab=1024, seed=0):
    """A one-layer llama-architecture mixture-of-experts model (Mixtral layout)."""
    import gguf

    from ggufopt_ray.gguf.vocab import build_spm_vocab

    rng = np.random.default_rng(seed)
    vocab = build_spm_vocab(n_vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(d // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_used)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)

    def mat(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    ones = np.ones(d, dtype=np.float32)
    tensors = {"token_embd.weight": mat(n_vocab, d), "output_norm.weight": ones, "output.weight": mat(n_vocab, d),
               "blk.0.attn_norm.weight": ones, "blk.0.ffn_norm.weight": ones,
               "blk.0.attn_q.weight": mat(d, d), "blk.0.attn_k.weight": mat(d, d),
               "blk.0.attn_v.weight": mat(d, d), "blk.0.attn_output.weight": mat(d, d),
               "blk.0.ffn_gate_inp.weight": mat(n_expert, d), "blk.0.ffn_gate_exps.weight": mat(n_expert, ff, d),
               "blk.0.ffn_up_exps.weight": mat(n_expert, ff, d), "blk.0.ffn_down_exps.weight": mat(n_expert, d, ff)}
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_mixture_of_experts_weights_get_per_expert_statistics(tmp_path):
    """MUL_MAT_ID: each token reaches n_used experts with the same input the router (a plain
    MUL_MAT) sees, so summed over experts the statistics are n_used times the router's."""
    model = _write_moe_model(tmp_path / "moe.gguf")
    im = collect_imatrix(model, _chunks(2, 64, seed=5), n_threads=1)
    router = im.entries["blk.0.ffn_gate_inp.weight"]
    assert router.counts.tolist() == [128]
    for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"):
        e = im.entries[name]
        assert e.sums.shape == (4, 256)
        assert int(e.counts.sum()) == 2 * 128
        np.testing.assert_allclose(e.sums.sum(axis=0), 2 * router.sums[0], rtol=1e-5)
    down = im.entries["blk.0.ffn_down_exps.weight"]
    assert np.array_equal(down.counts, im.entries["blk.0.ffn_up_exps.weight"].counts)
    # llama.cpp accepts the per-expert vectors (size n_cols * n_expert) for a 3-D weight
    r = quantize_model(model, "IQ4_XS", tmp_path / "moe-IQ4_XS.gguf", imatrix=im, threads=1)
    assert r.tensor_types["blk.0.ffn_up_exps.weight"] == "IQ4_XS"
