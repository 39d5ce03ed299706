"""Chunk files of the stores (store/chunkdir.py): large arrays written from their own buffers
into space HDF5 reserved, per-array checksums (XXH3-128 for new chunks, SHA-256 still verified
for chunks that recorded it), and clean failures on a full disk.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from ggufopt_ray.store import chunkdir
from ggufopt_ray.store.chunkdir import ChunkDirectory, DamagedFile


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": np.arange(512, dtype=np.int32),
        "payload_logprobs": rng.standard_normal((300, 4000)).astype(np.float16),  # 2.4 MB: large
        "payload_extra32": rng.standard_normal((70, 4000)).astype(np.float32),  # 1.1 MB: large
        "payload_flags": rng.random((1100, 1000)) > 0.5,  # 1.1 MB of bool: large
        "payload_xent_correction": rng.standard_normal(300).astype(np.float32),
        "payload_top_id": rng.integers(0, 4000, 300).astype(np.uint16),
    }


def _store(tmp_path) -> ChunkDirectory:
    d = ChunkDirectory(tmp_path / "store", "test")
    d.root.mkdir(parents=True)
    return d


def test_large_arrays_land_in_the_space_hdf5_reserved(tmp_path, monkeypatch):
    arrays = _arrays()
    d = _store(tmp_path)
    image, pieces = chunkdir._h5_image(arrays, {"n_tokens": 512, "chunk": 0})
    # every large array has reserved space of its own; the image does not hold them
    large = {k for k, a in arrays.items() if a.nbytes >= chunkdir.LARGE_ARRAY_BYTES}
    assert len(pieces) == len(large) == 3
    buf = image.getbuffer()
    for offset, arr in pieces:  # HDF5 never wrote into a reserved space (zeros, or past the image)
        assert not any(buf[offset:offset + arr.nbytes])
    # the baseline store's case, one large array: the image is just the metadata before it
    one = {"tokens": arrays["tokens"], "payload_logprobs": arrays["payload_logprobs"]}
    image1, pieces1 = chunkdir._h5_image(one, {"chunk": 0})
    assert len(pieces1) == 1 and len(image1.getbuffer()) == pieces1[0][0] < 64 << 10
    path = d.write_chunk(0, arrays, {"n_tokens": 512})
    raw = path.read_bytes()
    with h5py.File(path, "r") as f:
        for name, arr in arrays.items():
            dset = f[name]
            got = dset[()]
            assert got.dtype == arr.dtype and np.array_equal(got, arr), name
            if arr.nbytes >= chunkdir.LARGE_ARRAY_BYTES:
                # contiguous, and its bytes in the file are the array's own
                off = dset.id.get_offset()
                assert off is not None and raw[off:off + arr.nbytes] == arr.tobytes(), name
    back, attrs = d.read_chunk(0)
    assert attrs["n_tokens"] == 512 and set(back) == set(arrays)
    # identical content gives identical bytes (a resumed run writes what a fresh one does)
    again = _store(tmp_path / "again").write_chunk(0, arrays, {"n_tokens": 512})
    assert again.read_bytes() == raw
    assert not list(d.root.glob(".*.tmp"))


def test_new_chunks_record_xxh3_and_chunks_with_sha256_still_verify(tmp_path, monkeypatch):
    pytest.importorskip("xxhash")
    import xxhash

    arrays = _arrays(1)
    d = _store(tmp_path)
    d.write_chunk(0, arrays)
    with h5py.File(d.chunk_path(0), "r") as f:
        recorded = chunkdir._read_attrs(f)[chunkdir.CHECKSUM_ATTR]
    for name, arr in arrays.items():
        h = xxhash.xxh3_128()
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        assert recorded[name] == "xxh3_128:" + h.hexdigest()

    monkeypatch.setattr(chunkdir, "xxhash", None)  # a writer without xxhash: SHA-256, as before
    d.write_chunk(1, arrays)
    monkeypatch.undo()
    with h5py.File(d.chunk_path(1), "r") as f:
        legacy = chunkdir._read_attrs(f)[chunkdir.CHECKSUM_ATTR]
    arr = arrays["payload_logprobs"]
    assert legacy["payload_logprobs"] == hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode()
                                                        + arr.tobytes()).hexdigest()
    for i in (0, 1):  # both verify, and both catch one flipped bit in the large array
        back, _ = d.read_chunk(i)
        assert all(np.array_equal(back[k], v) for k, v in arrays.items())
        path = d.chunk_path(i)
        with h5py.File(path, "r") as f:
            off = f["payload_logprobs"].id.get_offset()
        data = bytearray(path.read_bytes())
        data[off + 12345] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(DamagedFile, match="checksum mismatch in array 'payload_logprobs'"):
            d.read_chunk(i)


def test_a_full_disk_is_one_clean_error_and_leaves_nothing(tmp_path):
    """Under a file size limit (a disk that is full for the process) the large array's write
    fails: one UserError naming the file, no temporary file, no chunk."""
    code = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from ggufopt_ray.errors import UserError
        from ggufopt_ray.store.chunkdir import ChunkDirectory
        d = ChunkDirectory({str(tmp_path / 'store')!r}, "test")
        d.root.mkdir()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            d.write_chunk(0, {{"big": np.ones((1000, 1000), np.float16)}})
        except UserError as e:
            print(e)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "chunk_000000.h5 (File too large); free disk space" in proc.stdout
    assert "Exception ignored" not in proc.stderr
    assert not list((tmp_path / "store").iterdir())
