"""The ``fastvae`` command and everything only it uses: training, the demo,
data loading, checkpoints, metrics, plots, and the ``export``/``infer`` commands.
The library (``fastvae`` and its other modules) never imports this package."""
