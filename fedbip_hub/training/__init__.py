"""Client-side training and evaluation: data, the Trainer-based training, quantization,
memory estimates, base-model loading and the bring-your-own-trainer hooks.
"""
