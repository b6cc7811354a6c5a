"""The replay server program (``python -m replay_server``): sum-tree, prioritized replay, snapshots,
rate limiter.

Imports only the shared library ``apex_zmq``, never another role package.
"""
