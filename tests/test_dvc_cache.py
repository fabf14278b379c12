"""The repository's DVC cache links outputs instead of copying them, and a stage that
replaces a persisted output (as pretrain's checkpoint writes do) leaves the cached
copy of the previous version intact. Real DVC in a throw-away repository."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Every test runs DVC in a subprocess.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# A stage whose output is persisted and rewritten on every run the way
# barlow.checkpoint.save_atomic and barlow.data.convert.write_beton write: a
# temporary file, then os.replace.
WRITE = ("import os, pathlib; n = pathlib.Path('n.txt').read_text(); "
         "pathlib.Path('.out.tmp').write_bytes(n.encode() * (1 << 20)); "
         "os.replace('.out.tmp', 'out.bin')")


def dvc(cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, text=True,
                            capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    (tmp_path / "n.txt").write_text("a")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n"
        f"    cmd: {sys.executable} -c \"{WRITE}\"\n"
        "    deps: [n.txt]\n"
        "    outs:\n      - out.bin:\n          persist: true\n")
    return tmp_path


def cached(repo: Path, data: bytes) -> Path:
    md5 = hashlib.md5(data).hexdigest()
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_repo_config_links_the_cache():
    result = subprocess.run([sys.executable, "-m", "dvc", "config", "cache.type"], cwd=REPO,
                            text=True, capture_output=True, check=True)
    assert "hardlink" in result.stdout and "copy" not in result.stdout


def test_outputs_are_stored_once_and_replacing_them_keeps_the_cache_intact(repo):
    dvc(repo, "repro", "-q")
    first = b"a" * (1 << 20)
    out, old = repo / "out.bin", cached(repo, first)
    # One file, two names: the output takes no space of its own (ext4 here: hardlink).
    assert out.stat().st_ino == old.stat().st_ino and out.stat().st_nlink == 2
    (repo / "n.txt").write_text("b")
    dvc(repo, "repro", "-q")
    # The stage replaced the persisted output; the old version in the cache is untouched.
    assert old.read_bytes() == first
    assert out.read_bytes() == b"b" * (1 << 20)
    assert out.stat().st_ino == cached(repo, out.read_bytes()).stat().st_ino
    assert "up to date" in dvc(repo, "status")
