from erase.cli import entry_point

entry_point()
