"""covid-xray: chest X-ray triage by transfer learning, evaluated honestly, served like SageMaker."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("covid-xray")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"
