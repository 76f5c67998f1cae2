"""`python -m qworker ...` runs the worker command."""

from qworker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
