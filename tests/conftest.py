"""Root conftest: the shared fixture modules of the suite (tests/ is on sys.path)."""

pytest_plugins = ["server_fixtures", "hsm_fixtures", "e2e_fixtures", "pg_fixtures"]
