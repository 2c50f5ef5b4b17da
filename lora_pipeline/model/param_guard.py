"""Unknown predict params are an error for this project's models, not silently dropped.

Why this exists: MLflow's pyfunc wrapper (`PyFuncModel.predict`) checks params against the logged
ParamSchema and drops the names it does not know with only a log warning, before the model sees
them; a client's `{"max_tokens": 5}` would be answered as if it had asked for the defaults. No public
MLflow API exposes the params as sent, so this wraps the one private function that filters them,
`mlflow.pyfunc._enforce_params_schema` (mlflow 3.17), and only for a ParamSchema with exactly this
project's param names; every other model keeps MLflow's behaviour. This is the project's one guarded
private-API use for predict params: `tests/per_step/test_serving_requests.py` fails loudly if
upstream renames or stops calling it. If the hook cannot be installed, serving still works, with
MLflow's warning for unknown params (logged here once as well).
"""

from __future__ import annotations

import functools
import logging
import threading

from lora_pipeline.model import requests

log = logging.getLogger(__name__)

_TARGET = "_enforce_params_schema"
_lock = threading.Lock()


def _is_ours(schema) -> bool:
    try:
        return {p.name for p in schema.params} == set(requests.PARAM_DEFAULTS)
    except AttributeError:  # no schema, or not a ParamSchema: MLflow's own checks handle it
        return False


def install() -> bool:
    """Wrap MLflow's params check once per process; True if the guard is (now) in place."""
    import mlflow.pyfunc

    with _lock:
        original = getattr(mlflow.pyfunc, _TARGET, None)
        if original is None:
            log.warning("mlflow.pyfunc.%s is gone (mlflow %s): unknown predict params are ignored "
                        "with MLflow's warning instead of refused", _TARGET, mlflow.__version__)
            return False
        if getattr(original, "_e2e_guard", False):
            return True

        @functools.wraps(original)
        def strict(params, schema, *args, **kwargs):
            if isinstance(params, dict) and _is_ours(schema):
                if unknown := requests.unknown_params(params):
                    raise requests.BadRequest(requests.unknown_params_message(unknown))
            return original(params, schema, *args, **kwargs)

        strict._e2e_guard = True
        setattr(mlflow.pyfunc, _TARGET, strict)
        return True
