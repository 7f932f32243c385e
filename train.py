"""Train any timm backbone with USI: ``composer train.py yamls/usi.yaml [key=value ...] [--dry-run]``."""

import sys

from usi_composer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
