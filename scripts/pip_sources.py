"""Print pip's effective package sources as uv flags, one `flag [value]` per line (scripts/setup.sh reads them).

uv reads no pip configuration; a machine whose pip finds wheels in a local folder, a mirror, or under a
constraints file must hand uv the same, or the two installers would install different files. The values come
from pip's own option parser (`pip install`'s options as its configuration files and environment set them),
not from parsing `pip config list`: that is the only way to get pip's precedence between its files and its
environment, and its multi-line values, exactly. It is pip's internal API, so when it moves this exits 1 and
setup.sh installs with pip.
"""

from __future__ import annotations

import sys


def uv_flags(options) -> list[tuple[str, ...]]:
    """pip's parsed install options → uv's flags for the same sources (and `cert`, which uv reads from
    SSL_CERT_FILE)."""
    flags: list[tuple[str, ...]] = []
    if options.no_index:
        flags.append(("--no-index",))
    elif options.index_url:
        flags.append(("--index-url", options.index_url))
    flags += [("--extra-index-url", url) for url in options.extra_index_urls or []]
    flags += [("--find-links", link) for link in options.find_links or []]
    flags += [("--constraint", path) for path in options.constraints or []]
    flags += [("--allow-insecure-host", host) for host in options.trusted_hosts or []]
    if options.cert:
        flags.append(("cert", options.cert))
    return flags


def pip_install_options():
    from pip._internal.commands import create_command

    options, _ = create_command("install").parse_args([])
    return options


if __name__ == "__main__":
    try:
        options = pip_install_options()
    except Exception as exc:  # pip's internals moved: say so; setup.sh falls back to pip
        print(f"pip_sources: cannot read pip's configuration ({exc})", file=sys.stderr)
        sys.exit(1)
    for flag in uv_flags(options):
        print(*flag)
