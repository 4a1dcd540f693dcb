"""CLI command modules: each defines ``add_arguments(parser)`` and ``run(args)``.

Imports of torch/transformers happen inside ``run`` so that building the parser stays instant.
"""
