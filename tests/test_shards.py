"""make test's runner (tests/shards.py): every file in exactly one shard, balanced, and a failing or
empty shard failing the whole run."""
import shutil
from pathlib import Path

import shards


def test_every_file_is_dealt_once_longest_first(monkeypatch):
    files = [Path(f"test_{c}.py") for c in "abcdefg"]
    for name, s in (("test_a.py", 50), ("test_b.py", 30), ("test_c.py", 25)):  # the rest: DEFAULT_S
        monkeypatch.setitem(shards.SECONDS, name, s)
    dealt = shards.deal(files, 2)
    load = [sum(shards.SECONDS.get(f.name, shards.DEFAULT_S) for f in s) for s in dealt]
    assert sorted(f for s in dealt for f in s) == sorted(files)
    assert load == [50 + 2 * shards.DEFAULT_S, 30 + 25 + 2 * shards.DEFAULT_S]
    assert shards.deal(files[:1], 3) == [[files[0]]]  # no empty shard


def test_exit_status_is_a_failing_shards(tmp_path, capsys):
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    assert shards.main(["--jobs", "2"], root=tmp_path) == 0
    (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert 1 == 2\n")
    assert shards.main(["--jobs", "2"], root=tmp_path) == 1
    out = capsys.readouterr().out
    kept = [ln.rsplit(" ", 1)[1] for ln in out.splitlines() if "temporary files are kept in" in ln]
    assert len(kept) == 1 and Path(kept[0]).is_dir()  # the failed shard's, for a look; the passed one's went
    shutil.rmtree(kept[0])
    last = out.splitlines()[-1]
    assert "1 passed" in last and "1 failed" in last and "test_bad.py::test_bad" in out
    assert shards.main(["--jobs", "2"], root=tmp_path / "none") == 5
