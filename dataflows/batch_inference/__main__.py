"""``python -m dataflows.batch_inference --job NAME --input ...``: run one batch job to its end."""

import sys

from dataflows.batch_inference.command import main

sys.exit(main())
