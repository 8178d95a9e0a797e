"""The event-driven adapters around the stages: Kafka topics and the store in, stage calls and events out.

    stream/   retrain.qa events -> the store (qa_events) and dead letters
    trigger/  the store -> S3 snapshots + retrain.requests (threshold, manual, drift)
    loop/     retrain.requests -> Ray jobs (train, gate) -> retrain.status
    cli.py    the ``medretrain`` command root; store.py the durable store they share
"""
