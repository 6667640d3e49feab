"""`knnssd serve`: an OpenAI-compatible HTTP server for a routing bundle (FastAPI + uvicorn).

    settings.py  ServeSettings: every flag of `knnssd serve` and its one default
    protocol.py  OpenAI request models, their validation, response bodies and error bodies
    text.py      incremental detokenising and stop strings
    work.py      one request's prompt ids, token budget and sampling, checked against the model
    engine.py    the bounded queue and the one worker thread that generates, one request at a time
    follow.py    the bundle being served, and following a registry alias to new versions
    metrics.py   the Prometheus metrics
    app.py       the FastAPI app and its routes (also what jobs/serve.py deploys on Ray Serve)

The `knnssd serve` command is knnssd/cli/serve.py. Needs the `serve` extra (fastapi, uvicorn, prometheus-client); imports no Ray.
"""
