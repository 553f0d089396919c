#!/usr/bin/env python
"""Train tread_scale from a yaml file: ``python launch.py yamls/tread_b2.yaml key=value ...``.

Multi-process: ``composer -n 8 launch.py yamls/tread_xl2.yaml``. Same as ``tread-scale train``.
"""

import sys

from tread_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], owns_process=True))
