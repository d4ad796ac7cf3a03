"""Ray-free stage implementations: plain Python / NumPy / PyTorch, each testable alone."""
