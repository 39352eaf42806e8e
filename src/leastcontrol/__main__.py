import sys

from .cli import main

if __name__ == "__main__":   # not when a worker process of `reproduce --jobs` imports it
    sys.exit(main())
