"""``marrowseg ARGV`` run in-process, as the tests that pin the command's outputs need it."""

from __future__ import annotations

import sys

from marrowseg import cli


def run_cli(*argv: str) -> int:
    """Run ``marrowseg ARGV`` in this process; return its exit status (0 on success)."""
    old, sys.argv = sys.argv, ["marrowseg", *argv]
    try:
        cli.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return 0
