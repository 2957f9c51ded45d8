"""Adapter initializers, one module each, chosen by `_target_` in conf/initializer/*.yaml."""
