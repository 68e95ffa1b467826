"""Models-from-code entry point of the attributes pyfunc (see extractor_model.py for why)."""

import mlflow

from registry.attributes_model import AttributesModel

mlflow.models.set_model(AttributesModel())
