"""``python -m tokenreduce``: the same as the ``tokenreduce`` command."""
import sys

from .cli import main

sys.exit(main())
