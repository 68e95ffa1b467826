"""Models-from-code entry point of the text pyfunc (see extractor_model.py for why)."""

import mlflow

from registry.text_model import TextModel

mlflow.models.set_model(TextModel())
