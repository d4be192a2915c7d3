"""Helpers of the Reply Guy bot (``bot.py``) that no other bot needs.

* :mod:`replyguy.length`: X's 280 weighted characters (URLs count 23), trimming.
* :mod:`replyguy.http`: one remote JSON API: deadline, breaker, backoff, rate limits.
* :mod:`replyguy.xapi`: the X API v2 client (bearer reads, OAuth 1.0a posts).
* :mod:`replyguy.ai`: the OpenAI-compatible client and the drafter.
* :mod:`replyguy.approval`: the operators' approval desk on a Telethon bot.
* :mod:`replyguy.state`: discovery cursors and the day's post count.
* :mod:`replyguy.health`: healthy | degraded | error.
* :mod:`devkit.standins`, :mod:`devkit.local_x`, :mod:`devkit.local_ai`:
  the local stand-in X and AI APIs of the embedded default and the tests.
"""
