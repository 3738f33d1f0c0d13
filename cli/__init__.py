"""The ``nsaflex`` command line (imports as ``nsaflex.cli``).

``nsaflex.cli.main:main`` is the click group behind the console script; each
subcommand lives in its own module of this package and is registered on the
group by :data:`nsaflex.cli.main.COMMAND_MODULES`.
"""
