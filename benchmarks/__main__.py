"""``python -m benchmarks NAME`` runs benchmarks/NAME.py; ``all`` runs every one."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import torch


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if m.name not in ("harness", "__main__"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m benchmarks NAME [ARGS...] | all\nbenchmarks: " + ", ".join(names))
        return 0
    torch.manual_seed(0)
    targets = names if argv[0] == "all" else [argv[0]]
    for name in targets:
        if name not in names:
            print(f"unknown benchmark {name!r}; available: {', '.join(names)}")
            return 2
        print(f"\n=== benchmark: {name}")
        importlib.import_module(f"benchmarks.{name}").main(argv[1:] if argv[0] != "all" else [])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
