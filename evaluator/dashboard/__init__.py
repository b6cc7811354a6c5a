"""The evaluator's live dashboard: a static page (``static/``), its HTTP server, learning-curve files."""
