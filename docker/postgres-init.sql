-- A database of its own for the gfocal results history (the Airflow metadata DB stays separate).
CREATE DATABASE gfocal_history OWNER airflow;
