"""Emulated Ascend tools for tests; `emulators.toolkit.make_toolkit` builds a fake CANN install."""
