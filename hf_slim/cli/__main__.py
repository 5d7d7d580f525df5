"""`python -m hf_slim.cli` = `hf-slim`."""

import sys

from . import main

sys.exit(main())
