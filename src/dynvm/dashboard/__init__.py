"""The web dashboard (``routes.py``) and its figures (``figures.py``)."""
