"""Write or compare the dependency lock (``requirements.lock``).

    python .ci/lock.py write requirements.lock   # freeze the running environment into the lock
    python .ci/lock.py diff requirements.lock    # print the packages that differ from the lock

Run with the interpreter of the environment to freeze or compare (``make lock`` and
``make test-latest`` do).  The lock pins every installed distribution, pip and setuptools
included, except echomoe itself; local version labels (``2.13.0+cpu``) are dropped so the pin
matches the ``torch==2.13.0`` that the Makefile installs first.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# Exact versions of every package `make demo` / `make test` install (pip constraints file).
# Regenerate with `make lock`: a fresh venv, torch first, then the newest releases that the ranges
# in setup.py allow. `make test-latest` runs the suite on such a venv without writing the lock.
"""
_SELF = "echomoe"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of the running environment, echomoe excluded."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) != _SELF:
            found[_canonical(name)] = dist.version.split("+", 1)[0]
    return found


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` from a lock file; lines other than ``name==version`` and
    comments are an error naming the line."""
    pins = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[_canonical(name.strip())] = version.strip()
    return pins


def write(path: Path) -> None:
    pins = installed()
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    path.write_text(HEADER + body, encoding="utf-8")
    print(f"wrote {len(pins)} pins to {path}")


def diff(path: Path) -> int:
    """Print what the running environment has that the lock does not; return the count."""
    locked, have = read_lock(path), installed()
    rows = []
    for name in sorted(locked.keys() | have.keys()):
        old, new = locked.get(name), have.get(name)
        if old != new:
            rows.append(f"  {name}: {old or '(not locked)'} -> {new or '(not installed)'}")
    if rows:
        print(f"{len(rows)} package(s) differ from {path} (lock -> this environment):")
        print("\n".join(rows))
    else:
        print(f"this environment matches {path} exactly")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "diff"))
    parser.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.lock)
    else:
        diff(args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
