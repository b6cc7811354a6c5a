"""The actor program (``python -m actor``): vectorised envs, acting, n-step segments, experience chunks.

Imports only the shared library ``apex_zmq``, never another role package.
"""
