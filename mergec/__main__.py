"""``python -m mergec``: the command line (also what ``torchrun -m mergec`` runs)."""
import sys

from mergec.cli import main

sys.exit(main())
