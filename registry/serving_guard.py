"""Request checks MLflow's scoring server does not make, wrapped around its ``invocations``.

Two hostile requests never reach the model's ``predict`` under ``mlflow models serve`` (MLflow
3.x, checked on 3.17):

* **Unknown params.** ``PyFuncModel._predict`` runs ``_enforce_params_schema``, which drops
  params the signature does not declare (a warning in the server log) and fills the declared ones
  with their defaults. ``predict`` cannot tell ``{"catgory": "dogs"}`` from no filter at all, so
  the typo came back as unfiltered results with HTTP 200.
* **Deeply nested JSON.** ``scoring_server._decode_json_input`` calls ``json.loads`` and catches
  ``JSONDecodeError``/``UnicodeDecodeError`` only; ``[[[[...`` deeper than the interpreter's
  recursion limit raises ``RecursionError``, which FastAPI turns into an HTTP 500.

Neither can be fixed from the model without touching the server, so :func:`install` (called by
the pyfunc's ``load_context``, and only inside the scoring server process) replaces the module
attribute ``mlflow.pyfunc.scoring_server.invocations``, which the ``/invocations`` route looks up
per request, with :func:`_guarded`: it parses a JSON body once (a ``RecursionError`` becomes a
400), refuses params the model's params schema does not declare (a 400 naming them), and hands
the parsed body to MLflow's own ``invocations`` (which accepts a dict); a refusal raised in ``predict`` comes back
with its reason only, not MLflow's repr of the input DataFrame in front of it. Anything else is
MLflow's unchanged behaviour. When MLflow's function no longer has the expected parameters,
nothing is installed and a warning says so.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

log = logging.getLogger(__name__)

_EXPECTED_PARAMETERS = ["data", "content_type", "model", "input_schema"]
_MARK = "_imgsearch_request_guard"


def _bad_request(message: str, response_type: Callable[..., Any]) -> Any:
    error = MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
    return response_type(
        response=error.serialize_as_json(),
        status=error.get_http_status_code(),
        mimetype="application/json",
    )


def unknown_params(body: Any, declared: set[str] | None) -> list[str]:
    """Names in ``body["params"]`` that the params schema (``declared``) does not have."""
    if declared is None or not isinstance(body, dict):
        return []
    params = body.get("params")
    if not isinstance(params, dict):
        return []
    return sorted(str(name) for name in params if str(name) not in declared)


_PREDICT_PREFIX = "Failed to predict data '"
_PREDICT_REASON = "\nError: "


def reason_only(message: str) -> str:
    """MLflow prefixes a refusal raised in ``predict`` with a repr of the whole input DataFrame
    (``Failed to predict data '   text lang\\n0 ...'. \\nError: <reason>``): keep the reason."""
    if message.startswith(_PREDICT_PREFIX) and _PREDICT_REASON in message:
        return message.rsplit(_PREDICT_REASON, 1)[1]
    return message


def _declared_params(model: Any) -> set[str] | None:
    metadata = getattr(model, "metadata", None)
    schema = metadata.get_params_schema() if metadata is not None else None
    return None if schema is None else {p.name for p in schema.params}


def _guard(original: Callable[..., Any], response_type: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _guarded(data: Any, content_type: Any, model: Any, input_schema: Any) -> Any:
        mime = str(content_type or "").split(";", 1)[0].strip().lower()
        if mime == "application/json" and isinstance(data, (bytes, str)):
            try:
                body = json.loads(data)
            except RecursionError:
                return _bad_request("request JSON is nested too deeply to parse", response_type)
            except ValueError:  # JSONDecodeError, UnicodeDecodeError: MLflow's own 400
                body = None
            unknown = unknown_params(body, _declared_params(model))
            if unknown:
                known = sorted(_declared_params(model) or ())
                return _bad_request(f"unknown params {unknown}; known: {known}", response_type)
            if isinstance(body, dict):
                data = body  # parsed once; MLflow's parser passes a dict through
        try:
            return original(data, content_type, model, input_schema)
        except RecursionError:  # nested input that pandas or the schema walk recursed into
            return _bad_request("request data is nested too deeply", response_type)
        except MlflowException as exc:
            exc.message = reason_only(exc.message)
            raise

    setattr(_guarded, _MARK, True)
    return _guarded


def install() -> bool:
    """Wrap the scoring server's ``invocations`` (once); True when the guard is in place.
    Outside the scoring server process (in-process ``load_model``), nothing is done."""
    try:
        from mlflow.pyfunc import scoring_server
    except ImportError:  # a slim MLflow without the server: nothing to guard
        return False
    if not os.environ.get(getattr(scoring_server, "_SERVER_MODEL_PATH", "__pyfunc_model_path__")):
        return False
    original = getattr(scoring_server, "invocations", None)
    if original is None or getattr(original, _MARK, False):
        return original is not None
    response_type = getattr(scoring_server, "InvocationsResponse", None)
    if list(inspect.signature(original).parameters) != _EXPECTED_PARAMETERS or not response_type:
        log.warning("MLflow's scoring server changed; unknown params are not refused by imgsearch")
        return False
    scoring_server.invocations = _guard(original, response_type)  # type: ignore[attr-defined]
    log.info("request guard installed: unknown params and over-deep JSON get HTTP 400")
    return True
