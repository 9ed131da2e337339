"""``python -m maxup`` (and ``torchrun -m maxup``): the command-line interface."""
from maxup.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
