"""Atomic file writes: write a temp file beside the target, then rename it into place, so a crash
never leaves a half-written file under the real name (checkpoints, configs, indexes)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` writes the content; it then replaces `target` in one rename."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    atomic_write(path, write)
