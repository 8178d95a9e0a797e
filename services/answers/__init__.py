"""The answer service: the production side of the loop.

    medretrain serve answers            # Ray Serve app on the stack's Ray head, http://127.0.0.1:18100/v1

In: questions (``POST /v1/answers``, ``schemas.serving.AnswerRequest``) and people's ratings or corrections
(``POST /v1/feedback``); the registry's ``champion`` / ``challenger`` aliases and ``retrain.status``
promotions, which decide the version served. Out: answers tagged with the version that generated them,
every answer on ``kafka.answers_topic`` and each verified pair as a QAEvent on ``kafka.events_topic``
(through the PostgreSQL outbox), Prometheus metrics, and a status the CLI reads.

app (Serve deployment), api (HTTP routes), models (base + adapters), watch (hot swap), keys, metrics: serving;
records, relay: what is stored and published.
"""
