"""The programs: ``demo``, ``bench`` and ``study``, on top of the adapters."""
