"""The single exception type of the data layer."""


class DataError(ValueError):
    """Bad data input: a missing path, an unreadable image, mismatched classes, ...

    The message always names the problem and how to fix it. It subclasses ``ValueError`` so
    callers that already catch bad-argument errors keep working.
    """
