"""`python -m cifar_train.push RUN_DIR user/name`: the command line lives with the others, in cli.py.

A module of its own, which nothing imports, so that the upload (this package) stays below the command lines.
"""

import sys

from cifar_train.cli import push_main

sys.exit(push_main())
