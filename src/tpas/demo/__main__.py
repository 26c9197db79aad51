"""`python -m tpas.demo OUT_DIR [flags]`: render the demo set (see --help)."""

from tpas.demo.cli import main

if __name__ == "__main__":
    main()
