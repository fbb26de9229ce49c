"""Helpers every layer builds on: the usage error, argument checks, atomic files, tensor trees, model
wrappers and devices. Nothing here knows about mixing."""
