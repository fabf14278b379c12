"""Disk used by a converted data set under DVC, per cache link type.

For each ``cache.type`` a throw-away git+DVC repository gets one stage that writes
the .beton and manifest files of --data (a converted set, e.g. data/ffcv after
`dvc repro convert`) into ``out/`` the way the convert stage does (temporary file,
then rename), and ``dvc repro`` runs it. Reported: the blocks used by the workspace
output and ``.dvc/cache`` together (each inode counted once, as ``du`` does for
hard links), the share of that over the data's own size, how the output is linked,
and the wall time of ``dvc repro`` (DVC hashes, commits and links the output).

    PYTHONPATH=src python benchmarks/bench_dvc_cache.py --data /path/to/converted/set
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("reflink,copy", "reflink,hardlink,symlink", "hardlink,symlink")

STAGE = """import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    if name.endswith((".beton", ".json")):
        tmp = os.path.join(dst, "." + name + ".tmp")
        shutil.copyfile(os.path.join(src, name), tmp)
        os.replace(tmp, os.path.join(dst, name))
"""


def disk_used(*roots: Path) -> int:
    """Bytes of allocated blocks under ``roots``, each inode once (du's rule)."""
    seen, total = set(), 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode:
        sys.exit(f"{' '.join(cmd)}: {result.stdout}{result.stderr}")


def measure(data: Path, cache_type: str, work: Path) -> dict:
    repo = work / cache_type.replace(",", "_")
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo)
    run([*dvc, "init", "-q"], repo)
    run([*dvc, "config", "cache.type", cache_type], repo)
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(
        f"stages:\n  convert:\n    cmd: {sys.executable} stage.py {data} out\n"
        "    deps: [stage.py]\n    outs: [out]\n")
    start = time.perf_counter()
    run([*dvc, "repro", "-q"], repo)
    wall = time.perf_counter() - start
    beton = next((repo / "out").glob("*.beton"))
    st = beton.lstat()
    link = ("symlink" if beton.is_symlink() else
            f"hardlink (nlink {st.st_nlink})" if st.st_nlink > 1 else "own copy")
    return {"bytes": disk_used(repo / "out", repo / ".dvc" / "cache"), "link": link,
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a converted set's folder")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the repositories go (default: a temporary folder)")
    args = parser.parse_args()
    data = args.data.resolve()
    own = disk_used(data)
    print(f"data: {data}, {own / 1e6:.1f} MB on disk")
    print(f"{'cache.type':26} {'workspace + cache':>18} {'× data':>7}  {'output is':24} "
          f"{'dvc repro':>9}")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for cache_type in TYPES:
            r = measure(data, cache_type, Path(tmp))
            print(f"{cache_type:26} {r['bytes'] / 1e6:15.1f} MB {r['bytes'] / own:7.2f}  "
                  f"{r['link']:24} {r['wall']:8.1f}s")


if __name__ == "__main__":
    main()
