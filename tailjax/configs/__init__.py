"""Experiment configs: one ``get_config(arg)`` per file; derived configs import their base
(``from tailjax.configs import fastflow_textures``).

Part of the tailjax package (nothing named ``configs`` is installed top-level, so no
other project's ``configs`` is shadowed). Pass a file to a command by path, as
big_vision does: ``tailjax train --config=configs/fastflow_textures.py[:smoke]``. A
``configs/...`` path that does not exist under the current directory names the file
here, so the documented commands work from the repository root and from any other
directory; a ``configs/`` folder of your own in the current directory takes precedence.
"""
