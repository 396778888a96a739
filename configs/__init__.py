# The recipes ship inside the package as `gantrain.configs` (see pyproject.toml's package-dir), so
# `pip install .` and a wheel find them; Hydra reads them through `pkg://gantrain.configs`.
