"""Study orchestration: the layer above the core.

Modules here wire data, the training engine, evaluation and reports into the
studies (study A and its sweeps and analysis, the study-B diagnosis). Core
modules (everything in ``tailjax`` outside this package) never import from
here; ``tests/test_layering.py`` checks that.
"""
