"""`python -m gdnspec ...` runs the command line (gdnspec/cli.py)."""
import sys

from gdnspec.cli import main

sys.exit(main())
