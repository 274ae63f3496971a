"""The on-disk cache (cache.py): `liveindex cache` and `liveindex cache clear` run for real on a
temporary LIVEINDEX_CACHE, and the size limit: least recently used dictionaries go after a
build, never one in use (by this process or another)."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from liveindex.models.ebsd import cache


def run_liveindex(root, *args, timeout=120):
    env = {**os.environ, "LIVEINDEX_CACHE": str(root)}
    return subprocess.run([sys.executable, "-m", "liveindex.stream", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def fake_dictionary(root, key, size=1000, age=0.0):
    folder = root / "dictionaries" / key
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({
        "phase": "ni", "resolution_deg": 3.0, "n_templates": 10,
        "geometry": {"pc": [0.425, 0.213, 0.501], "pattern_shape": [30, 30], "sample_tilt": 70.0}}))
    (folder / "templates.bin").write_bytes(b"\0" * size)
    (folder / cache.LAST_USED).touch()
    past = time.time() - age
    os.utime(folder / cache.LAST_USED, (past, past))
    return folder


@pytest.fixture
def filled(tmp_path):
    root = tmp_path / "cache"
    fake_dictionary(root, "ni-aaaa-r3-v1", 3_000_000, age=100)
    fake_dictionary(root, "ni-bbbb-r3-v1", 2_000_000, age=10)
    (root / "master_patterns").mkdir()
    (root / "master_patterns" / "fe-kinematical-20kv-v1.npy").write_bytes(b"\0" * 1_000_000)
    (root / "network_codebooks").mkdir()
    (root / "network_codebooks" / "abc-r3-v2.npz").write_bytes(b"\0" * 500_000)
    (root / "spot_templates").mkdir()
    (root / "spot_templates" / "0123456789abcdef0123.npz").write_bytes(b"\0" * 250_000)
    return root


def test_cache_shows_folders_sizes_and_what_each_is_for(filled):
    proc = run_liveindex(filled, "cache")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"liveindex cache: {filled} (LIVEINDEX_CACHE): 6.8 MB of its 5 GB limit (LIVEINDEX_CACHE_LIMIT_GB)" in out
    assert "spot_templates/" in out and "0.2 MB  1 item(s): spot-pattern template libraries" in out
    assert "not liveindex's" not in out
    assert "dictionaries/" in out and "5.0 MB  2 item(s): template dictionaries" in out
    assert "master_patterns/" in out and "1.0 MB  1 item(s): kinematical master patterns" in out
    assert "network_codebooks/" in out and "code book" in out
    # Each dictionary: size, when last used, what it was made for; the most recently used first.
    assert out.index("ni-bbbb-r3-v1") < out.index("ni-aaaa-r3-v1")
    assert "ni, PC (0.4250, 0.2130, 0.5010), 30x30 px, tilt 70 deg, 3 deg, 10 templates" in out


def test_cache_clear_removes_what_it_is_told(filled):
    proc = run_liveindex(filled, "cache", "clear")
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 item(s) (dictionaries), 5.0 MB" in proc.stdout
    assert not list((filled / "dictionaries").glob("ni-*-v1"))
    assert (filled / "master_patterns" / "fe-kinematical-20kv-v1.npy").exists()
    proc = run_liveindex(filled, "cache", "clear", "--master-patterns")
    assert proc.returncode == 0 and not (filled / "master_patterns" / "fe-kinematical-20kv-v1.npy").exists()
    assert (filled / "network_codebooks" / "abc-r3-v2.npz").exists()
    proc = run_liveindex(filled, "cache", "clear", "--spot-templates")
    assert proc.returncode == 0 and not list((filled / "spot_templates").glob("*.npz"))
    assert (filled / "network_codebooks" / "abc-r3-v2.npz").exists()
    proc = run_liveindex(filled, "cache", "clear", "--all")
    assert proc.returncode == 0 and not any(p.is_file() for p in filled.rglob("*") if p.suffix != ".lock")


def test_a_dictionary_another_process_uses_is_not_cleared(filled):
    held = filled / "dictionaries" / "ni-aaaa-r3-v1"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from liveindex.models.ebsd import cache
        in_use = cache.use_dictionary(Path({str(held)!r}), build=None, ready=lambda: True)
        print("holding", flush=True)
        sys.stdin.read()  # until the test closes our stdin
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert "IN USE" in run_liveindex(filled, "cache").stdout
        proc = run_liveindex(filled, "cache", "clear")
        assert "removed 1 item(s)" in proc.stdout and "kept 1 dictionary in use by a running process: ni-aaaa" in proc.stdout
        assert held.exists() and not (filled / "dictionaries" / "ni-bbbb-r3-v1").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert "removed 1 item(s)" in run_liveindex(filled, "cache", "clear").stdout
    assert not held.exists()


def test_the_limit_evicts_the_least_recently_used_dictionaries_after_a_build(tmp_path, monkeypatch):
    """Real (coarse, small) dictionaries built by dictionary.load_or_build under a limit that
    holds two of them: each build removes the least recently used one not in use."""
    from liveindex.models.ebsd.dictionary import DictionarySpec, load_or_build
    from liveindex.models.ebsd.geometry import DetectorGeometry

    root = tmp_path / "cache"

    def spec(x):
        return DictionarySpec("ni", DetectorGeometry(pattern_shape=(16, 16), pc=(x, 0.213, 0.501)), resolution=20.0)

    def folder(x):
        return spec(x).folder(root)

    def build(x):
        return load_or_build(spec(x), root=root, progress=False)

    a = build(0.40)
    one = cache._size(folder(0.40))
    monkeypatch.setenv(cache.LIMIT_ENV, str(2.5 * one / 1e9))
    del a
    gc.collect()
    build(0.41)
    gc.collect()
    c = build(0.42)  # three over a limit of two and a half: the oldest (0.40) goes
    assert not folder(0.40).exists() and folder(0.41).exists() and folder(0.42).exists()
    past = time.time() - 1000
    os.utime(folder(0.42) / cache.LAST_USED, (past, past))  # the one in use is now the least recently used
    build(0.43)
    gc.collect()
    assert folder(0.42).exists(), "a dictionary in use was evicted"
    assert not folder(0.41).exists() and folder(0.43).exists()
    assert c.size > 0
    assert [e.path.name for e in cache.entries(root) if e.in_use] == [folder(0.42).name]


def test_a_bad_limit_is_reported_and_the_default_kept(monkeypatch, caplog):
    monkeypatch.setenv(cache.LIMIT_ENV, "lots")
    assert cache.limit_bytes() == int(cache.DEFAULT_LIMIT_GB * 1e9)
    assert "LIVEINDEX_CACHE_LIMIT_GB='lots' is not a positive number of gigabytes" in caplog.text


def test_the_cache_root_is_the_dictionaries(monkeypatch, tmp_path):
    from liveindex.models.ebsd.dictionary import cache_dir

    monkeypatch.setenv("LIVEINDEX_CACHE", str(tmp_path))
    assert cache.cache_root() == cache_dir() == tmp_path


def test_the_limit_evicts_an_old_spot_library_too(filled):
    spot = filled / "spot_templates" / "0123456789abcdef0123.npz"
    past = time.time() - 1000
    os.utime(spot, (past, past))  # the least recently used of all
    removed = cache.enforce_limit(filled, limit=int(6.7e6))  # 6.75 MB in all: one small item over
    assert removed == [spot] and not spot.exists()
    assert len(list((filled / "dictionaries").iterdir())) == 2  # the dictionaries stay: within the limit now
