import os
import sys

# tests import their shared helpers (oracle.py) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
