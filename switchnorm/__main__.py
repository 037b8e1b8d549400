"""``python -m switchnorm``: the same command as ``switchnorm`` (see switchnorm.train.cli)."""

import sys

from switchnorm.train.cli import main

sys.exit(main())
