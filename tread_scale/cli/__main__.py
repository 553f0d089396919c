"""``python -m tread_scale.cli`` (what ``composer -n N -m tread_scale.cli ...`` and torchrun run)."""

import sys

from tread_scale.cli import main

sys.exit(main())
