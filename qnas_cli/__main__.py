"""python -m qnas_cli (also what torchrun -m qnas_cli runs)."""
from .cli import main

main()
