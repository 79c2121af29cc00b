import sys

from sessa_jax.export.cli import main

sys.exit(main())
