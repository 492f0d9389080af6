"""``python -m bench [--only loss,data,step,startup,sweep] [--quick] [--device cpu|cuda]``."""

import sys

from bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
