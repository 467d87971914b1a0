"""Replaying demand on dynvm's own engine in virtual time (``dynvm replay``): ``model.py``
is the hosts, ``runner.py`` the clock and the events."""
