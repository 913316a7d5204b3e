"""`python -m bulkdedupe`."""

from .cli import main

main()
