"""One image that can never be stored does not hold up the others, nor keep the storage breaker open.

The poison image's object path is blocked (a stray file where its directory
must be), so every store of it fails with a transient error, as a broken
disk or bucket path would. Its failures open the storage breaker; images
refused by the open breaker spend no attempt; the trials go to the others
as the poison one waits out its backoff; it ends ``failed`` with its reason
and one ``processing_failed`` alert, and the breaker closes.
"""

from __future__ import annotations

from pathlib import Path

from ingest import image_policy, object_key
from shared.alerts import AlertType
from shared.breaker import CircuitBreaker, CircuitState
from shared.config import IngestSettings, load_settings
from shared.db.records import IngestStatus
from shared.images import process_image
from shared.storage import LocalBackend, Storage
from tests.helpers import RecordingAlerts
from tests.test_ingest import Harness, h, png, s3_bucket, s3_server, wait_until  # noqa: F401


def blocked_storage(root: Path, settings: IngestSettings, poison: bytes, normal: list[bytes]) -> Storage:
    """Local storage where ``poison``'s object can never be written (and the others' can)."""
    policy = image_policy(settings)
    key = object_key(process_image(poison, policy=policy))
    others = {object_key(process_image(data, policy=policy)).split("/")[1] for data in normal}
    prefix = key.split("/")[1]
    assert prefix not in others, "pick seeds whose hashes differ in their first two characters"
    (root / "ingest").mkdir(parents=True)
    (root / "ingest" / prefix).write_bytes(b"a stray file where a directory must be")
    breaker = CircuitBreaker("local_storage", failure_threshold=2, recovery_timeout=1.0)
    return Storage(LocalBackend(root), timeout=5.0, breaker=breaker)


async def test_an_image_that_can_never_be_stored_is_failed_with_its_reason_and_the_others_are_stored(
    h: Harness, tmp_path: Path  # noqa: F811
) -> None:
    env = {"MAX_MESSAGE_RETRIES": "2"}
    settings = load_settings(IngestSettings, {**h.env, **env})
    poison = png(1000)
    policy = image_policy(settings)
    poison_prefix = object_key(process_image(poison, policy=policy)).split("/")[1]
    normal_seeds = [s for s in range(1, 60) if object_key(process_image(png(s), policy=policy)).split("/")[1] != poison_prefix][:6]
    storage = blocked_storage(tmp_path / "objects", settings, poison, [png(s) for s in normal_seeds])
    alerts = RecordingAlerts()

    async with h.running(env=env, storage=storage, alerts=alerts) as bot:
        first = h.world.post_to_channel("@demo_photos", poison, as_document=True, mime_type="image/png", file_name="poison.png")
        posted = [h.post_png(seed) for seed in normal_seeds[:4]]
        await wait_until(lambda: h.count(len(posted)), timeout=30, what="the normal images stored")
        await wait_until(lambda: h.count(1, "failed"), timeout=30, what="the poison image given up")
        queue = bot.runtime.queues["ingest"]
        await wait_until(lambda: len(queue) == 0, what="the queue drained")
        # Later images are the trial calls that close the breaker the poison image left open (2 successes).
        late = [h.post_png(seed) for seed in normal_seeds[4:]]
        await wait_until(lambda: h.count(len(posted) + 2), timeout=30, what="later images stored")
        await wait_until(lambda: storage.breaker.state is CircuitState.CLOSED, what="the breaker closed")

    rows = {r.message_id: r for r in await h.rows()}
    dead = rows[first.id]
    assert dead.status is IngestStatus.FAILED and dead.error.startswith("gave up after 2 retries:")
    assert "FileExistsError" in dead.error or "exists" in dead.error
    assert all(rows[m.id].status is IngestStatus.STORED for m in [*posted, *late])
    assert [key for kind, _, key in alerts.alerts if kind is AlertType.PROCESSING_FAILED] == ["ingest:exhausted"]
