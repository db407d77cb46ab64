"""The broker: client frontend, worker backend, routing and placement, stats (see broker.py)."""
from .broker import BindError, Broker, run_broker

__all__ = ["BindError", "Broker", "run_broker"]
