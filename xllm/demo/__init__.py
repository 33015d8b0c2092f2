"""Talking to a trained model: a chat session over any of its modalities, in the terminal or the browser."""
