"""Merge plug-ins: how a trained stage joins the earlier ones. One module each, chosen by `_target_`."""
