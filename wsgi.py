"""WSGI entry point: `gunicorn wsgi:app` (see conf/gunicorn.conf.py)."""

from gateway import create_app

app = create_app()
