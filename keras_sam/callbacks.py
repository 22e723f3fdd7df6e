"""Keras callbacks of keras_sam; they report through `logs`."""
