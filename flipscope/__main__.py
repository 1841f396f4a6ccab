"""`python -m flipscope` is the `flipscope` command."""

from flipscope.cli import main

main()
