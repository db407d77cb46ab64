"""lipsync-cluster: serve many lip-sync avatars to many viewers from a pool of workers."""

__version__ = "0.1.0"
