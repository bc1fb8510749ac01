"""One child benchmark process, run on a quiet machine or beside a spinning process (the "other load")."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_child(cmd: list[str], nice: int | None) -> Any:
    """Runs ``cmd`` (a benchmark child printing one JSON line last) with, when ``nice`` is not None,
    a busy Python process at that niceness beside it; returns the decoded JSON."""
    spin = f"import os; os.nice({nice or 0}); exec('while True: pass')"
    hog = subprocess.Popen([sys.executable, "-c", spin]) if nice is not None else None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])
