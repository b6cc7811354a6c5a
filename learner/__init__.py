"""The learner program (``python -m learner``): loaders, the learning-rule seam (``--algo``), double DQN.

Imports only the shared library ``apex_zmq``, never another role package.
"""
