"""Serving models to people: a terminal chat (terminal.py) and an HTTP server with a web page (app.py)."""
