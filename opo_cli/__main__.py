"""`python -m opo_cli COMMAND ...`: the `opo` command run by this interpreter, found without
PATH (the tests call it so, whether or not the environment's bin/ is on PATH)."""

from opo_cli.cli import main

if __name__ == "__main__":
    main()
