"""The QA stream: validated question-answer events into the durable store.

Inputs: ``QAEvent`` JSON on the ``retrain.qa`` topic (``publisher`` writes them from MedQuAD or a file).
Outputs: rows in ``qa_events`` (``ingest``), ``DeadLetter`` records on the dead-letter topic for bad
input, Prometheus metrics (``metrics``); the accumulator calls ``services.trigger`` after each batch.
"""
