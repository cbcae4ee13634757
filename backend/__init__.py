"""The FastAPI backend: pages (Jinja2 templates from ``frontend/``) and the JSON API. Uses ``clipscope`` only."""
