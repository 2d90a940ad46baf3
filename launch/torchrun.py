"""torchrun (`python -m torch.distributed.run`, same arguments) as launch/*.sh start it.

One difference: a job stopped by a signal ends without the agent's traceback. On SIGINT or SIGTERM
the agent passes the signal on to its ranks, which finish their step, save a checkpoint and say so in
one line (train/guard.py, train/main.py); the agent then raises SignalException, which torchrun prints
as a traceback. Here it exits with 128 + the signal's number instead, as a shell reports a process a
signal ended.
"""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as err:
        sys.exit(128 + int(err.sigval))
