"""python -m qgmrn.train"""
import sys

from . import main

sys.exit(main())
