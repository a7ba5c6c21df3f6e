"""Running and administering the service: the `peeraid-service` command (serve, api, worker, migrate,
keys and limits, reconcile, demo). It starts the API (api/) and the Celery worker (worker/) as processes."""
