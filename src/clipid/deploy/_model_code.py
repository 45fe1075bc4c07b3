"""The pyfunc's entry point as MLflow's "model from code" (no pickled Python object in the
model): MLflow copies this file into the model and runs it at load time."""

from mlflow.models import set_model

from clipid.deploy.pyfunc import ClipidEmbedder

set_model(ClipidEmbedder())
