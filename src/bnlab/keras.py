"""``bnlab.keras``: where Keras weight files were first read and written; the code lives in :mod:`bnlab.tools.keras`.

``bnlab.keras.load_weights`` and ``bnlab.keras.save_weights`` keep working
(the README shows them); new code may import either module.
"""

from .tools.keras import load_weights, save_weights

__all__ = ["load_weights", "save_weights"]
