"""``python -m clipid``: what torchrun starts in every process of a distributed stage."""

import sys

from clipid.cli import main

sys.exit(main())
