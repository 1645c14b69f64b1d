"""Operator tooling: the ``afc`` command line."""
