"""Cluster configuration: YAML with the seeds' sections, defaults for everything, strict checks."""
from .schema import (CapacityConfig, ClusterConfig, Config, ConfigError, LoggingConfig, ModelEntry,
                     OnnxConfig, ServerConfig, load_config)

__all__ = ["CapacityConfig", "ClusterConfig", "Config", "ConfigError", "LoggingConfig", "ModelEntry",
           "OnnxConfig", "ServerConfig", "load_config"]
