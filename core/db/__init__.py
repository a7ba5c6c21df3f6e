"""The service's database: SQLAlchemy 2 models (the source of truth for jobs) and sessions."""
