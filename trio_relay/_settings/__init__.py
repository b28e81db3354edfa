"""``trio-relay serve``'s settings and the ``trio-relay`` command.

- `settings`: the settings, declared once as attrs classes; the list of them (`all_settings`)
  and the docs table;
- `load`: `load_settings`, which reads the config file, the environment and the flags through
  typed-settings loaders and merges them;
- `convert`: the strict converter that checks the merged values, and the wording of every
  problem;
- `cli`: the ``trio-relay`` command (serve, config check, pin, devices; chat comes from the
  client).
"""
