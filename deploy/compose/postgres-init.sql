-- Runs once, on an empty data volume: the medretrain store's database is POSTGRES_DB, MLflow gets its own.
CREATE DATABASE mlflow;
