"""Amazon SageMaker integration: the script-mode training entry point (`entry`, `train.py`), the
serving handlers (`handlers`, `inference.py`), and the launcher (`launcher`) that trains, deploys,
predicts and cleans up on managed SageMaker, in local mode, or in local processes."""
