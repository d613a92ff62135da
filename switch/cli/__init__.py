"""The ``cardswitch`` command-line layer: one module per command group over the library.

What lives here: argument parsing, output and exit statuses of the operator commands.
What does not: the operations the commands drive (``switch``, ``hsm``), which never import
this package.
"""
