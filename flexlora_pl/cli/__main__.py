"""``python -m flexlora_pl.cli`` runs the ``flexlora`` command."""

from flexlora_pl.cli.main import main

main()
