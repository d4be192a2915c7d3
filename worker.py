"""worker.py is not built yet (issue 6). It exits with code 2 so nothing mistakes it for a running bot."""

import sys

if __name__ == "__main__":
    sys.stderr.write("worker.py is not built yet (issue 6); nothing was started.\n")
    sys.exit(2)
