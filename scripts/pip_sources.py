"""Print pip's effective package sources as uv flags, one `flag value` per line (scripts/setup.sh reads them).

uv reads no pip configuration; a machine whose pip finds wheels in a local folder, a mirror, or under a
constraints file (this one: `pip config list`) must hand uv the same, or the two installers would install
different files. pip's own precedence holds: its environment variables, then `install`, then `global`.
"""

from __future__ import annotations

import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "cert": "cert"}
RANK = {":env:": 0, "install": 1, "global": 2}


def sources(listing: str) -> list[tuple[str, str]]:
    """`pip config list` output → (flag, value) pairs, each multi-valued setting split on whitespace."""
    chosen: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if name not in FLAGS or section not in RANK:
            continue
        rank = RANK[section]
        if name not in chosen or rank < chosen[name][0]:
            chosen[name] = (rank, value.strip().strip("'\""))
    return [(FLAGS[name], item) for name, (_, value) in chosen.items() for item in value.split()]


if __name__ == "__main__":
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False).stdout
    for flag, value in sources(listed):
        print(flag, value)
