"""The label convention both stages share."""

IGNORE_INDEX = -100
"""Label value of prompt and padding positions (the transformers convention): not trained, not scored."""
