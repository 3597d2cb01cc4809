#!/opt/venv/bin/python
"""ENTRYPOINT of the covid-xray SageMaker image: the same contract as AWS's PyTorch containers.

SageMaker (and SDK local mode's docker-compose) starts the container with one argument:

- `train`: AWS's training toolkit (`sagemaker-training`'s `train`), which reads /opt/ml/input/config,
  installs `requirements.txt` from the source dir, and runs `SAGEMAKER_PROGRAM` through the framework
  module named by `SAGEMAKER_TRAINING_MODULE` (sagemaker-pytorch-training's, as in AWS's image).
- `serve`: the module:function in `SAGEMAKER_SERVING_MODULE` (sagemaker-pytorch-inference's
  `serving:main`), which writes TorchServe's config, installs /opt/ml/model/code/requirements.txt and
  runs TorchServe on port 8080 with the toolkit's handler (model_fn/input_fn/predict_fn/output_fn
  from /opt/ml/model/code/inference.py).
- anything else is executed as given (`docker run IMAGE python -c ...`, `bash`).

For `train` and `serve` this process stays PID 1 as a small init: it runs the job in a child,
forwards SIGTERM/SIGINT/SIGHUP to it (so `docker stop` ends a job or the server at once), reaps
every orphan (TorchServe's Java server is one: the toolkit waits for it by polling its pid), and
exits with the job's status. A server that stops on its own therefore stops the container.
"""

from __future__ import annotations

import os
import signal
import sys

TRAIN = ["train"]  # console script of sagemaker-training
DEFAULT_SERVING_MODULE = "sagemaker_pytorch_serving_container.serving:main"


def serve_command() -> list[str]:
    module, _, function = os.environ.get("SAGEMAKER_SERVING_MODULE", DEFAULT_SERVING_MODULE).partition(":")
    code = f"import sys, {module} as m; sys.exit(m.{function or 'main'}())"
    return [sys.executable, "-c", code]


def run_as_init(argv: list[str]) -> int:
    """Fork/exec argv, forward signals to it, reap every child; return argv's exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"dockerd-entrypoint: cannot run {argv[0]}: {e}", file=sys.stderr, flush=True)
            os._exit(127)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    while True:
        try:
            done, status = os.wait()  # any child: the job, or an orphan re-parented to PID 1
        except ChildProcessError:
            return 1  # the job is gone without our seeing it exit: cannot happen, but do not hang
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def main(argv: list[str]) -> int:
    if not argv:
        argv = ["bash"]
    if argv[0] == "train":
        return run_as_init(TRAIN + argv[1:])
    if argv[0] == "serve":
        return run_as_init(serve_command())
    if len(argv) == 1 and " " in argv[0]:  # one string with spaces: a shell command line
        argv = ["bash", "-c", argv[0]]
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"dockerd-entrypoint: cannot run {argv[0]}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
