"""`meshctl` (the console script) and `python -m meshctl`: `validate` and `plan` through a running
compile server (meshctl.client, standard library only), else meshctl.cli."""

import sys


def main() -> None:
    from meshctl.client import served

    code = served(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from meshctl.cli import main as cli

    cli(prog_name="meshctl")  # (usage names `meshctl`, not `python -m meshctl`)


if __name__ == "__main__":
    main()
