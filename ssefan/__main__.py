"""`python -m ssefan` runs the same command line as the `ssefan` script."""

from ssefan.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
