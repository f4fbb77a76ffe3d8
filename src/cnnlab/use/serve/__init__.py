"""`cnnlab serve`: a web page to draw or upload pictures for trained runs, and its JSON API."""
from cnnlab.use.serve.app import create_app

__all__ = ["create_app"]
