"""supervisor.py is not built yet (issue 9). It exits with code 2 so nothing mistakes it for a running bot."""

import sys

if __name__ == "__main__":
    sys.stderr.write("supervisor.py is not built yet (issue 9); nothing was started.\n")
    sys.exit(2)
