"""`python -m server [MODEL] [options]` = `stoke serve`."""

import sys

from server.launch import main

sys.exit(main())
