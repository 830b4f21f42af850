"""eksft: selective SFT cold start (EKSFT and baselines), evaluation and the SFT -> RL pipeline.

Importing this package stays light: vLLM and Ray are imported lazily where they are used.
"""

__version__ = "0.1.0"
