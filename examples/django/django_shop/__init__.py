"""A tiny Django shop that drains without loss; see ``examples/django/README.md``."""
