from meshctl.cli import main

main(prog_name="meshctl")  # usage and hints name the command users type, not `python -m meshctl`
