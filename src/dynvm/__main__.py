"""``python -m dynvm``: the same as the ``dynvm`` command."""

from dynvm.cli import main

main()
