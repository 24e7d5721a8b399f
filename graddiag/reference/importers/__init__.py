"""Framework importers: torch models (torch.fx) and Keras models into the engine's graph.

Each importer imports its framework only when used.
"""
