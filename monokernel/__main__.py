"""`python -m monokernel` = the `monokernel` command."""
import sys

from .cli import main

sys.exit(main())
