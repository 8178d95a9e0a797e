"""The web console of the answer service: sign in, ask and give feedback, review and promote, watch the pipeline.

    app.include_router(console_router(backend))     # in services.answers.api.build_api: same app, same keys
    http://127.0.0.1:18100/console                  # sign in with a name and the api or the reviewer key

Input: the signed-in person's forms (plain POSTs, each with the session's token). Output: what the same
functions write for ``/v1`` and ``medretrain registry`` (answers and feedback in the answer store, registry
aliases and their audit tags), with the signed-in name as the actor. Templates and static files ship in the
package: no build step, nothing fetched at runtime.
"""

from services.answers.console.routes import console_router

__all__ = ["console_router"]
