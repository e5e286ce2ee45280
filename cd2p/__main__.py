"""``python -m cd2p`` (and ``torchrun -m cd2p``) runs the command line."""

from cd2p.cli import main

if __name__ == "__main__":
    main(prog_name="cd2p")
