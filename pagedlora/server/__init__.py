"""The HTTP server (``pagedlora serve``): OpenAI- and SageMaker-compatible endpoints over one
engine per base model, each driven by its own engine loop thread.

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client). Modules: ``config``
(ServerConfig), ``engine_loop`` (the thread that owns an Engine), ``registry`` (model and
adapter names), ``protocol`` (request bodies, errors), ``state`` (what routes share),
``openai_routes`` and ``sagemaker_routes``, ``metrics`` (Prometheus), ``app`` (build_app).
"""
