"""Subcommands of the ``gradpress`` CLI, one module each (see :mod:`gradpress.cli`)."""
