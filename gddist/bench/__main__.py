"""`python -m gddist.bench`: see gddist/bench/__init__.py."""

from gddist.bench import main

if __name__ == "__main__":
    main()
