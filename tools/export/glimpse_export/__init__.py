"""Glimpse export tools: tiny random-weight VLMs in the onnx-community layout, plus fixtures.

Run as ``python -m glimpse_export <command>`` (see ``tools/export/README.md``).
"""

__version__ = "0.1.0"

from . import common  # noqa: E402,F401  (sets the offline / threading environment before torch / transformers)
