"""Amazon SageMaker integration: the script-mode training entry point (`entry`, `train.py`), the
serving handlers (`handlers`, `inference.py`), and the workflow that trains, deploys, predicts and
cleans up (`launcher`) on managed SageMaker or in local mode through the SDK (`sdk`), or in local
processes without Docker (`local_process`), with the endpoints it returns (`endpoints`) and what
they share (`jobs`)."""
