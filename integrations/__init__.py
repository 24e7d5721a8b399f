"""Third-party trainer glue, installed as `graddiag.integrations` (see pyproject's package-dir)."""
