import os
import sys

# Benchmarks import the test-free helpers beside them (shapes.py).
sys.path.insert(0, os.path.dirname(__file__))
