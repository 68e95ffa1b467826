"""Models-from-code entry point of the extractor pyfunc.

MLflow stores this file with the model and runs it at load time, instead of unpickling a Python
object (RELIABILITY 7: nothing the registry serves is a pickle).
"""

import mlflow

from registry.models import ExtractorModel

mlflow.models.set_model(ExtractorModel())
