"""`payments secrets rotate`: re-seal every image secret under PAYMENTS_SECRET_KEY.

Run it after setting PAYMENTS_SECRET_KEY to the new key and PAYMENTS_SECRET_KEY_PREVIOUS to the
old one; when it reports every secret sealed with the current key, the previous key can go.
Each secret is opened and re-sealed in one transaction; nothing is printed but counts.
"""

from __future__ import annotations

from sqlalchemy import select

from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import LicenseImage
from shared.secrets_box import SecretBox, parse_key
from shared.settings import Settings


async def rotate(settings: Settings) -> tuple[int, int]:
    """Returns (re-sealed, already current)."""
    current = parse_key(settings.secret_key.get_secret_value() if settings.secret_key else None)
    if current is None:
        raise ValueError("PAYMENTS_SECRET_KEY is unset")
    previous_value = settings.secret_key_previous
    box = SecretBox(
        current, parse_key(previous_value.get_secret_value() if previous_value else None)
    )
    engine = make_engine(settings.resolved_database_url)
    resealed = current_count = 0
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            for image in (await session.execute(select(LicenseImage))).scalars():
                if box.sealed_with_current(image.secret_sealed):
                    current_count += 1
                    continue
                plaintext = box.open(image.secret_sealed, image.image_ref)
                image.secret_sealed = box.seal(plaintext, image.image_ref)
                resealed += 1
    finally:
        await engine.dispose()
    return resealed, current_count
