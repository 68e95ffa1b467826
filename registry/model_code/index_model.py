"""Models-from-code entry point of the index pyfunc (see extractor_model.py for why)."""

import mlflow

from registry.models import IndexModel

mlflow.models.set_model(IndexModel())
