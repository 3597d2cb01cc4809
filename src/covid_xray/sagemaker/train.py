"""SageMaker `entry_point`: the launcher copies this file to the root of `source_dir` as train.py,
next to a copy of the covid_xray package, and AWS's PyTorch training container runs it."""

import sys

from covid_xray.sagemaker.entry import main

if __name__ == "__main__":
    sys.exit(main())
