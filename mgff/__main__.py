"""``python -m mgff fit|validate|test|predict --config experiments/<name>.yaml``."""

from mgff.cli import main

if __name__ == "__main__":
    main()
