"""Experiment configs: one ``get_config(arg)`` per file; derived configs import their base.

Installed with tailjax (``pip install -e .``), so ``from configs import
fastflow_textures`` works from any directory. Pass a file to a command with
``tailjax train --config=configs/fastflow_textures.py[:smoke]``; a
``configs/...`` path that does not exist under the current directory is read
from this package.
"""
