"""How the multi-process test workers end."""

import os
import sys


def quick_exit() -> None:
    """Leave without the interpreter's teardown once the results are on disk: destroying DeepSpeed's
    and gloo's background threads at exit aborts now and then on CPU ("terminate called without an
    active exception"), which would fail a test whose work succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
