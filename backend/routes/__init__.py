"""HTTP routes: ``pages`` (HTML, kept out of the OpenAPI schema) and ``api`` (JSON under /api)."""
