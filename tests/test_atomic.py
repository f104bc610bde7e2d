"""Every file the package produces goes through files.atomic_write (temporary name, fsync,
rename) or a documented equivalent; this scan fails when new code writes a file in place."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "saescope"
WRITES = re.compile(r"""open\([^)]*["'][wax]b?["']|\.write_text\(|\.write_bytes\(|savefig\((?!buf)|np\.savez?\((?!buf)|"""
                    r"""\.save_pretrained\(|torch\.save\((?!state, buf)|\.to_parquet\(|sqlite3\.connect\(""")  # buf: in memory
# where a write is in place on purpose, and why it is safe
ALLOWED = {
    "files.py": "atomic_write itself",
    "data/store.py": "a shard is written under a .partial name and renamed on commit",
    "explore/build.py": "spill files in a temporary folder; the database under .partial, renamed when done",
    "explore/db.py": "connect() opens the database build.py writes under its .partial name",
    "lm/loading.py": "the dequantised model goes to a temporary folder, renamed when complete",
    "train/trainer.py": "metrics.jsonl is appended, and cut back to the checkpoint's step on resume",
}


def test_no_file_is_written_in_place():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if WRITES.search(line) and rel not in ALLOWED:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert all((SRC / rel).is_file() for rel in ALLOWED)
