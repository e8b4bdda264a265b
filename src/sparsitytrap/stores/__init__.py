"""One module per store format: each names its arrays and attributes, and writes, opens and checks its store.

Every other module reads and writes a store only through its owner here.
"""
