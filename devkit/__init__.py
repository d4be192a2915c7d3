"""The development kit: what stands in for the real platforms, never part of a real deployment.

* :mod:`devkit.sandbox`: a Telegram stand-in that speaks real Telethon TL
  objects (accounts, chats, channels, media, flood limits, access hashes,
  update gaps) with fault injection (hangs, RPC errors, latency, lost answers).
* :mod:`devkit.standins`, :mod:`devkit.local_x`, :mod:`devkit.local_ai`: the
  local X and AI HTTP APIs the Reply Guy talks to in sandbox mode, with
  faults set over HTTP.

The bots import this package only in sandbox mode (no Telegram credentials and
either nothing configured or ``SANDBOX=1``), through their client factories;
tests and benchmarks import it directly. Nothing in ``shared/`` or
``replyguy/`` imports it at module level.
"""
