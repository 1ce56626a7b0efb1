import sys

from fastdit.cli import main

if __name__ == "__main__":  # guard: compile-report's worker processes re-import this module
    sys.exit(main())
