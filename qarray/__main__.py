"""``python -m qarray``: a short tour on an embedded default. See :mod:`qarray._tour`."""

from qarray._tour import main

if __name__ == '__main__':
    main()
