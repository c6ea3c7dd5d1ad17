"""``python -m eora_ft.cli`` = ``eora-ft``."""

import sys

from eora_ft.cli import main

sys.exit(main())
