"""Once per node before training: remove stale mosaicml-streaming shared memory left by a crashed run."""

from __future__ import annotations

import logging
import socket
import sys

from tread_scale.log_setup import setup_logging

log = logging.getLogger("tread_scale.node_prep")


def main() -> int:
    setup_logging("INFO")
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    log.info("node %s: cleared stale shared memory", socket.gethostname())
    return 0


if __name__ == "__main__":
    sys.exit(main())
