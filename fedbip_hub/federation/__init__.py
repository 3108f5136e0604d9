"""A federation as its members see it: its config and state in the federation repo,
the client commands (init, join, push, pull), status, and model cards.
"""
