"""gfocal_pipeline: the Airflow-free core of gfocal-airflow (model, export, data, backends, evaluation)."""

__version__ = "0.1.0"
