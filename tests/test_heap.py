"""keep_freed_memory: glibc's settings change once for nested uses and are restored after."""

import threading

import numpy as np
import pytest

from napari_mtml import heap


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    lib = _FakeLibc()
    monkeypatch.setattr(heap, "_libc_cache", [lib])
    monkeypatch.delenv("MTML_KEEP_FREED", raising=False)
    return lib


def test_nested_uses_set_once_and_restore_at_the_last_exit(fake_libc):
    with heap.keep_freed_memory() as on:
        assert on is True
        assert fake_libc.calls == [
            ("mallopt", heap._M_MMAP_MAX, 0),
            ("mallopt", heap._M_TRIM_THRESHOLD, heap._KEEP_TRIM_THRESHOLD),
        ]
        with heap.keep_freed_memory():
            pass
        assert len(fake_libc.calls) == 2  # the inner exit restores nothing
    assert fake_libc.calls[2:] == [
        ("mallopt", heap._M_MMAP_MAX, heap._DEFAULT_MMAP_MAX),
        ("mallopt", heap._M_TRIM_THRESHOLD, heap._DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0),
    ]


def test_restored_after_an_error_and_across_threads(fake_libc):
    with pytest.raises(RuntimeError):
        with heap.keep_freed_memory():
            raise RuntimeError("boom")
    assert fake_libc.calls[-1] == ("malloc_trim", 0) and heap._depth == 0

    inside, release = threading.Event(), threading.Event()

    def worker():
        with heap.keep_freed_memory():
            inside.set()
            release.wait(10)

    fake_libc.calls.clear()
    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    with heap.keep_freed_memory():
        pass
    assert ("malloc_trim", 0) not in fake_libc.calls  # the worker is still inside
    release.set()
    t.join(10)
    assert fake_libc.calls[-1] == ("malloc_trim", 0) and heap._depth == 0


def test_turned_off_or_without_glibc_it_does_nothing(fake_libc, monkeypatch):
    monkeypatch.setenv("MTML_KEEP_FREED", "0")
    with heap.keep_freed_memory() as on:
        assert on is False
    assert fake_libc.calls == []
    monkeypatch.delenv("MTML_KEEP_FREED")
    monkeypatch.setattr(heap, "_libc_cache", [None])
    with heap.keep_freed_memory() as on:
        assert on is False
    assert not heap.heap_control_available()


def test_the_real_allocator_gives_the_same_arrays():
    # On this platform's own libc (a no-op where it is not glibc): big blocks allocated and
    # freed inside come back with the right contents, and the settings are restored after.
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(64, 256, 256)).astype(np.float32)  # 16 MiB
    with heap.keep_freed_memory():
        for _ in range(3):
            big = np.empty((96, 256, 256), np.float32)  # 24 MiB, then freed
            big[:] = 1.0
            del big
            got = expected * 2.0
            np.testing.assert_array_equal(got / 2.0, expected)
    assert heap._depth == 0


def test_disabled_by_the_caller_it_does_nothing(fake_libc):
    with heap.keep_freed_memory(False) as on:
        assert on is False
    assert fake_libc.calls == []
