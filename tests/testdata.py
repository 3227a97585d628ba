"""Fetch the npm test material the tests need into a cache directory (run by ./dev test)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
