"""Multi-process integration tests: a real Celery deployment (see cluster.py)."""
