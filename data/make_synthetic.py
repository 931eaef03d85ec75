#!/usr/bin/env python3
"""Generate the synthetic Criteo-schema data set (see data/README.md).

    python data/make_synthetic.py --out data/generated/synthetic
"""

import sys

from deepfm_dist.prepare.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
