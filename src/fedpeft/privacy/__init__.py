"""Differential privacy (``[privacy]``): client-level DP-FedAvg (:mod:`fedpeft.privacy.client_level`)
and its RDP accountant (:mod:`fedpeft.privacy.accountant`). See docs/methods.md: Differential privacy."""
