"""``surm`` subcommands owned outside ``cli.py``: each module has ``add_parser(subparsers)``
(which sets ``func=run`` on its parser) and ``run(args)``."""
