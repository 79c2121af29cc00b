"""Errors of the data package."""


class DataError(ValueError):
    """Bad input data: names the file and the problem (missing, empty, not UTF-8, too short)."""
