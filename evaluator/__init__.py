"""The evaluator program (``python -m evaluator``): evaluation protocols, scores, the run monitor, the
dashboard, and ``play`` (``apex-zmq play``).

Imports only the shared library ``apex_zmq``, never another role package.
"""
