"""dynvm's Xen side against simulated hosts, over real sockets (fixtures: tests/conftest.py)."""
