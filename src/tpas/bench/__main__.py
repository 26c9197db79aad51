"""`python -m tpas.bench NAME [flags]`: run the benchmark tpas.bench.NAME (see --help of each)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import tpas.bench


def _names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(tpas.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> None:
    names = _names()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m tpas.bench {{{','.join(names)}}} [flags]   (each takes --help)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(f"tpas.bench.{argv[0]}")
    module.main(argv[1:], prog_name=f"python -m tpas.bench {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
