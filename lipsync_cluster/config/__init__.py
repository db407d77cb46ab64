"""Cluster configuration: YAML with the earlier single-process server's sections, defaults for everything, strict checks."""
from .schema import (CapacityConfig, ClusterConfig, Config, ConfigError, LoggingConfig, ModelEntry,
                     OnnxConfig, ServerConfig, load_config)

__all__ = ["CapacityConfig", "ClusterConfig", "Config", "ConfigError", "LoggingConfig", "ModelEntry",
           "OnnxConfig", "ServerConfig", "load_config"]
