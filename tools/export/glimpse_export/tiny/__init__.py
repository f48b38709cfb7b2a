"""Tiny random-weight parity fixtures: the ``tiny`` command (``pipeline``) and ``check`` (``check``)."""
