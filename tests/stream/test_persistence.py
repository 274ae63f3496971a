"""The sink's journal and the dispatcher's page store, on real files."""

import logging

import numpy as np

from liveindex.stream.journal import Journal, replay
from liveindex.stream.page_store import PageStore
from liveindex.stream.protocol import decode, encode


def test_journal_replays_messages_and_cuts_a_torn_last_record(tmp_path):
    path = tmp_path / "s.journal"
    journal = Journal(path)
    messages = [encode("scan_end", {"scan": f"s{i}", "frames_sent": i, "status": "success"}) for i in range(3)]
    for m in messages:
        journal.append(m)
    journal.close()
    good_size = path.stat().st_size
    with open(path, "ab") as f:  # a kill in the middle of the next write
        f.write(b"\x02\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00abc")
    replayed = [decode(frames).header["scan"] for frames in replay(path)]
    assert replayed == ["s0", "s1", "s2"]
    assert path.stat().st_size == good_size
    appended = Journal(path, append=True)
    appended.append(messages[0])
    appended.close()
    assert [decode(f).header["scan"] for f in replay(path)] == ["s0", "s1", "s2", "s0"]


def _page(first, n=10):
    return np.full((n, 8, 8), first % 251, np.uint8)


def test_page_store_spills_beyond_its_memory_limit_and_gives_pages_back(tmp_path):
    store = PageStore(memory_limit=3 * 640, spill_dir=tmp_path / "spill")
    for first in range(0, 100, 10):
        assert store.add(first, _page(first))
    assert store.memory_bytes <= 3 * 640 and store.peak_memory_bytes <= 3 * 640
    assert store.spilled_frames == 70
    for first in range(0, 100, 10):
        np.testing.assert_array_equal(store.get(first), _page(first))
        store.release(first)
    assert store.spilled_frames == 0 and store.memory_bytes == 0
    assert not list((tmp_path / "spill").glob("*/*.npy"))
    store.close()
    assert not list((tmp_path / "spill").iterdir())


def test_page_store_keeps_pages_in_memory_when_the_disk_refuses(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    store = PageStore(memory_limit=640, spill_dir=blocker / "spill")
    with caplog.at_level(logging.ERROR):
        for first in range(0, 50, 10):
            assert store.add(first, _page(first))
    assert "cannot spill pages" in caplog.text and "--spill-dir" in caplog.text
    assert store.memory_bytes == 5 * 640  # over the limit, but nothing lost
    assert all((store.get(f) == _page(f)).all() for f in range(0, 50, 10))


def test_page_store_in_preview_mode_drops_instead_of_spilling(tmp_path):
    store = PageStore(memory_limit=2 * 640, spill_dir=tmp_path, preview=True)
    kept = [store.add(first, _page(first)) for first in range(0, 50, 10)]
    assert kept == [True, True, False, False, False]
    assert store.dropped_frames == 30 and store.spilled_frames == 0


def test_a_failed_append_leaves_no_torn_record_before_later_ones(tmp_path, monkeypatch):
    import os as os_module

    path = tmp_path / "s.journal"
    journal = Journal(path)
    m = [encode("scan_end", {"scan": f"s{i}", "frames_sent": i, "status": "success"}) for i in range(3)]
    journal.append(m[0])
    real_writev = os_module.writev

    def short_writev(fd, parts):  # the disk fills after a few bytes
        return real_writev(fd, [bytes(parts[0])[:3]])

    monkeypatch.setattr(os_module, "writev", short_writev)
    try:
        journal.append(m[1])
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("a short write must raise")
    monkeypatch.setattr(os_module, "writev", real_writev)
    journal.append(m[2])  # space is back
    journal.close()
    assert [decode(f).header["scan"] for f in replay(path)] == ["s0", "s2"]
