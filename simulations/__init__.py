"""Bonsai's shipped experiment and study files (YAML), installed as package data.

``bonsai run NAME`` / ``bonsai sweep NAME`` find them by name from any directory
(:mod:`fl.catalog`); ``bonsai init DIR`` copies them to edit. Each file's first
line is the command that runs it.
"""
