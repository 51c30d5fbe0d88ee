pytest_plugins = ["tests.fix_pools"]
