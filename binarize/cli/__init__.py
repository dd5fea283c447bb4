"""The ``binarize`` command line: a thin typer layer over the library's public API."""
