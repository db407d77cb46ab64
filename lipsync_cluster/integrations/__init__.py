"""Voice-agent integrations built on :mod:`lipsync_cluster.client.av` (docs/INTEGRATIONS.md).

``integrations.pipecat`` (extra ``pipecat``) and ``integrations.livekit`` (extra ``livekit``) each
import their framework only there; this package itself imports nothing of either.
"""
