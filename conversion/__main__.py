"""`python -m longllama.conversion SRC DST [options]`: see `longllama.conversion.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
