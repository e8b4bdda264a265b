"""Atomic outputs: nothing half-written survives a failure, and a killed writer's temporaries go."""

import pytest

from sparsitytrap.io import atomic_path


def test_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "store.zarr"
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "chunk").write_text("half")
        raise ValueError("boom")
    assert not list(tmp_path.iterdir())


def test_the_next_write_removes_a_killed_writers_temporaries(tmp_path):
    out = tmp_path / "S1.zarr"
    stale = tmp_path / ".S1.zarr.tmp-99999999"  # what kill -9 of a writer leaves
    (stale / "counts").mkdir(parents=True)
    other = tmp_path / ".S10.zarr.tmp-1"  # another output's temporary is not touched
    other.mkdir()
    with atomic_path(out) as tmp:
        tmp.mkdir()
    assert out.is_dir() and not stale.exists() and other.exists()
