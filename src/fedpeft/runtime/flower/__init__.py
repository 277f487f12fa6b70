"""The Flower runtimes: simulation (``flower-sim``) and deployment (``flower``).

``app`` (the ServerApp and ClientApp over the shared round loop), ``wire`` (named states as
Flower ArrayRecords), ``launch`` (``run_simulation`` / ``flwr run``), ``deploy`` (a loopback
SuperLink + SuperNodes), ``supernode``, ``worker``, ``server_worker`` and ``polling`` (warm
processes and their waits). Every ``flwr`` import of fedpeft lives in this package.
"""
