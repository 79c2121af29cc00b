"""Pure functions: no parameters, no module state. Models compose these."""
