"""`code/inference.py` of a SageMaker model: the PyTorch serving container imports the four
handlers from here (the covid_xray package sits next to this file in code/)."""

from covid_xray.sagemaker.handlers import input_fn, model_fn, output_fn, predict_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn"]
