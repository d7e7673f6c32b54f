"""Pure ML: the networks, the objectives, the samplers, EMA and metric arithmetic.

Rule: imports only torch, numpy, einops (xformers where it works) and core/ itself; never opens
a file and never calls accelerate. Everything here takes tensors and configs and returns
tensors, so it can be read, tested against a closed form or a second implementation, and reused
without the harness. A network is one file with its own config (networks/); an objective is one
file with its own config section, targets, samplers and rules (objectives/).
"""
