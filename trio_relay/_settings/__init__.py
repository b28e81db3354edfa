"""Settings of ``trio-relay serve`` (`settings`) and the ``trio-relay`` command (`cli`)."""
