#!/usr/bin/env python3
"""Convert Criteo TSV (Kaggle train.txt, Terabyte day_N[.gz]) to Parquet (see data/CRITEO.md).

    python data/prepare_criteo.py --input 'day_*.gz' --output data/criteo_tb --split terabyte
"""

import sys

from deepfm_dist.prepare.criteo import main

if __name__ == "__main__":
    sys.exit(main())
