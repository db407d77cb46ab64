"""Tools built on the client library: the load test, the live stats console and ``render``.

They sit above ``client`` (which stays what a client-only install needs) and below ``cli``.
"""
