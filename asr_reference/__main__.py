"""``python -m asr_reference ...``: the command line lives in :mod:`asr_reference.cli` (one module per command)."""

from asr_reference.cli import main

if __name__ == "__main__":
    main()
