"""Training-time regularizers (stability losses). One module each, chosen by `_target_`."""
