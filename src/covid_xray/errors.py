"""Errors a user can cause. The CLI prints their message as one line; nothing else is caught."""


class CovidXrayError(Exception):
    """A problem with the user's input or setup, stated as one actionable sentence."""


class DataError(CovidXrayError):
    """The dataset layout, manifest or class set is unusable."""


class ImageError(CovidXrayError):
    """One file cannot be read as an image."""


class ModelError(CovidXrayError):
    """Unknown backbone, missing weights, or a bundle that cannot be loaded."""
