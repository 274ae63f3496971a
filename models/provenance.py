"""Where a trained bundle came from: the git commit of the code that made it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(root: Path, exclude: str) -> str:
    """The commit of the checkout holding ``root``, with "+dirty" where a tracked file under
    ``root`` has changed, leaving out ``exclude`` (a path relative to ``root``: the bundle being
    written is not part of what made it); "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":!{exclude}"], capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
