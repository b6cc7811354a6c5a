"""apex-zmq: Ape-X distributed prioritized experience replay over ZeroMQ."""

__version__ = "0.1.0"
