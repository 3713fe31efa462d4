"""`python -m tunelab ...` is the `tunelab` command, so `accelerate launch -m tunelab run RECIPE` works."""

from tunelab.cli.app import main

if __name__ == "__main__":
    main()
