"""The server's round: collect the members' uploads, validate them, weight and merge,
publish each member's personalized adapter and record the round.
"""
