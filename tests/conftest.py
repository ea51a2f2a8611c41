
# Genesys Cloud sandbox fixtures (`sandbox`, `sandbox_client`); tests/ is on sys.path (no __init__.py).
pytest_plugins = ["sandbox_fixtures"]
