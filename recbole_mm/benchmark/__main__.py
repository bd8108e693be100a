import sys

from recbole_mm.benchmark.cli import main

if __name__ == "__main__":  # guarded: worker processes import the main module again
    sys.exit(main())
