"""One module per chapter that needs more than a few calls: its scenarios, its own tables and its verdict rows.

A chapter module imports only from below it (`labkit.book`, `labkit.scenarios`, `labkit.plots` and
the core); chapters never import each other. What two chapters share moves down a layer.
"""
