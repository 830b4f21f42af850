"""rl: GRPO on vLLM rollouts with a rule-based math verifier.

Takes a dataset of {prompt, answer} rows and a model directory; knows nothing of SFT.
vLLM and Ray are imported lazily where they are used.
"""
