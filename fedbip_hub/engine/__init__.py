"""The method's pure tensor maths, with no Hub, store or training code: task vectors,
Gram matrices, similarity and its sketch, weighting rules and strategies, the merge,
similarity memory and the guards against hostile updates.
"""
