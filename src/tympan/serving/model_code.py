"""The served model as code (MLflow's models-from-code): loading runs this file, so the
model package holds no pickle for anyone with write access to the artifact store to replace."""

from mlflow.models import set_model

from tympan.serving.pyfunc import AudioModel

set_model(AudioModel())
