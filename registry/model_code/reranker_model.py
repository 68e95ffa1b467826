"""Models-from-code entry point of the reranker pyfunc (see extractor_model.py for why)."""

import mlflow

from registry.reranker_model import RerankerModel

mlflow.models.set_model(RerankerModel())
