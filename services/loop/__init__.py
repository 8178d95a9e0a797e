"""The retrain loop: requests into Ray jobs, job outcomes into status events.

Inputs: ``RetrainRequest`` JSON on ``retrain.requests``; the ``retrain_requests`` table (write-ahead job ids).
Outputs: a training job and then a gate job on Ray per request, ``RetrainStatus`` events on
``retrain.status``; ``status`` and ``timeline`` read the store and MLflow back for people; ``demo``
runs the whole loop once on the embedded stack.
"""
