"""traindeck's trainer: pure building blocks and the training loop.

This package never imports ``server`` or ``web``: the loop talks to the outside world only
through the small channel protocol in ``trainer_core.channel``.
"""

__version__ = "0.1.0"
