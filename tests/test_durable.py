"""The content digest of manifests and exports: what it equals, and that it finds damage."""
from __future__ import annotations

import hashlib

import pytest
import xxhash

from modules import durable


def by_hand(data: bytes, block: int) -> str:
    """The digest as its docstring defines it, from the whole content in memory (a second implementation)."""
    blocks = [data[i:i + block] for i in range(0, len(data), block)] or [b""]
    return "xxh3:" + xxhash.xxh3_128(b"".join(xxhash.xxh3_128(b).digest() for b in blocks)).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4321])
def test_the_digest_is_xxh3_of_the_block_digests_however_the_blocks_fall(size, tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "DIGEST_BLOCK", 1000)     # several blocks, each read in several chunks
    monkeypatch.setattr(durable, "HASH_BLOCK", 64)
    data = bytes((i * 7919) % 251 for i in range(size))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert durable.digest_file(path) == by_hand(data, 1000)


def test_a_flipped_bit_or_a_legacy_sha256_record_is_judged_right(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "DIGEST_BLOCK", 1000)
    path = tmp_path / "f.bin"
    data = bytearray(range(256)) * 20
    path.write_bytes(bytes(data))
    recorded, legacy = durable.digest_file(path), hashlib.sha256(bytes(data)).hexdigest()
    assert durable.digest_matches(path, recorded) and durable.digest_matches(path, legacy)
    for where in (0, 999, 1000, len(data) - 1):      # first, block edges, last byte
        damaged = bytearray(data)
        damaged[where] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert not durable.digest_matches(path, recorded), where
        assert not durable.digest_matches(path, legacy), where


def test_a_manifest_finds_a_changed_file_under_either_record(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    files = durable.manifest(tmp_path)
    assert files["a.bin"]["digest"].startswith("xxh3:")
    legacy = {"a.bin": {"size": 100, "sha256": hashlib.sha256(b"x" * 100).hexdigest()}}
    assert durable.manifest_problem(tmp_path, files, deep=True) is None
    assert durable.manifest_problem(tmp_path, legacy, deep=True) is None
    (tmp_path / "a.bin").write_bytes(b"y" * 100)      # same size: only the content check sees it
    for record in (files, legacy):
        assert durable.manifest_problem(tmp_path, record) is None
        assert "a.bin changed since it was written" in durable.manifest_problem(tmp_path, record, deep=True)
