"""``python -m graddiag``: the ``graddiag`` command line (see `graddiag.cli`)."""

from graddiag.cli import main

if __name__ == "__main__":
    main()
