"""Science tools: memory-tail measurements (influence.py, constructions.py) and matched
family comparisons (compare.py)."""
