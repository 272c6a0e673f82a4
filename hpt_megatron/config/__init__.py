"""Typed configuration tree, YAML loading with dotted overrides, and translators."""

from hpt_megatron.config.base import ConfigError, dump_yaml, from_dict, to_dict
from hpt_megatron.config.schema import HPTConfig, load_config

__all__ = ["ConfigError", "HPTConfig", "dump_yaml", "from_dict", "load_config", "to_dict"]
