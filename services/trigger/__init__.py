"""When to retrain and on what: the threshold, manual and drift triggers, and the snapshot export.

Inputs: rows in ``qa_events`` and ``snapshots`` (the store), the champion's drift reference (MLflow).
Outputs: a frozen snapshot in S3 (``export``: ``datasets/<snapshot_id>/``, manifest last), its
``snapshots`` row, and a ``RetrainRequest`` on ``retrain.requests`` (``trigger``); drift results as
MLflow runs (``drift_monitor``).
"""
