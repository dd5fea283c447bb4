"""``python -m binarize.cli``: the same as the ``binarize`` command."""

from binarize.cli.main import main

main()
