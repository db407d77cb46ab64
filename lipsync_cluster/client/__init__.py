"""Python client of a lipsync-cluster broker: ``Client`` (blocking, thread-safe) and ``AsyncClient``."""
from ..common.errors import (BadRequest, CapacityFull, InternalError, LipsyncError, ModelLoadFailed, Overloaded,
                             RequestTimeout, Unauthorized, Unavailable, UnknownModel)
from .av import AsyncAVSession, AVFrame, AVSession
from .client import AsyncClient, Client
from .results import InferResult
from .stream import AsyncStreamSession, StreamFrame, StreamSession

__all__ = ["Client", "AsyncClient", "InferResult", "StreamSession", "AsyncStreamSession", "StreamFrame",
           "AVSession", "AsyncAVSession", "AVFrame", "LipsyncError", "BadRequest", "UnknownModel",
           "ModelLoadFailed", "CapacityFull", "Overloaded", "RequestTimeout", "Unavailable", "Unauthorized",
           "InternalError"]
