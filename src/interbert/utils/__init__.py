"""Small helpers shared by the recipes (config files, ...)."""

from interbert.utils.config_files import ConfigError, add_config_arguments, load_config, parse_override

__all__ = ["ConfigError", "add_config_arguments", "load_config", "parse_override"]
