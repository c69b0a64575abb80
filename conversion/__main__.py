"""`python -m longllama.conversion SRC DST [options]`: see `longllama.conversion.convert.main`."""

import sys

from .convert import main

if __name__ == "__main__":
    sys.exit(main())
