"""``python -m qarray``: a short tour on an embedded default. See :mod:`qarray.tour`."""

from qarray.tour import main

if __name__ == '__main__':
    main()
