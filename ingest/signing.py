"""Signing hrefs before they are read: Planetary Computer's SAS tokens, within a time budget.

Planetary Computer serves its imagery from Azure Blob Storage, which refuses a read without
a token; its token service hands one out per storage container. The ``planetary-computer``
package asks with ten retries, backing off for minutes, and no timeout at all: offline, a
run waited 7.4 minutes before it failed, for tokens of assets it never read. Here only the
assets a run reads are signed, on the node that reads them (tokens never travel with tasks,
items or logs), and the token service gets one total time budget per item
(:data:`SIGN_TIMEOUT_S`, the ``sign_timeout_s`` read option, or the environment's
``RELAYMAP_SIGN_TIMEOUT_S``): tries, each bounded by what is left of it, with a short back
off between them, then one line naming the way out (``--sign none``, ``PC_SDK_SAS_URL``,
``PC_SDK_SUBSCRIPTION_KEY``).

Tokens are shared with the ``planetary-computer`` package's cache (one per container,
reused until a minute before expiry); its settings (``PC_SDK_SAS_URL``,
``PC_SDK_SUBSCRIPTION_KEY``, ``~/.planetarycomputer/settings.env``) apply.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs, urlparse

import pystac

from relaymap.catalog.storage import redact

from .errors import IngestError

#: The token service's total time budget per item, in seconds (all tries and waits).
SIGN_TIMEOUT_S = 30.0
#: The environment variable that changes :data:`SIGN_TIMEOUT_S` (the ``sign_timeout_s``
#: read option, when set, wins).
SIGN_TIMEOUT_ENV = "RELAYMAP_SIGN_TIMEOUT_S"
#: Waits between tries (seconds; the last repeats), each cut to what is left of the budget.
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
#: Blob storage that Planetary Computer signs (as ``planetary_computer.sign_url``).
BLOB_DOMAIN = ".blob.core.windows.net"
#: Planetary Computer's public thumbnails: never signed.
PUBLIC_ACCOUNT = "ai4edatasetspublicassets.blob.core.windows.net"


class SigningError(IngestError):
    """Hrefs could not be signed (the token service refused or cannot be reached): the
    message names the service, what was tried, and the way out."""


def default_timeout_s() -> float:
    """:data:`SIGN_TIMEOUT_S`, or the environment's ``RELAYMAP_SIGN_TIMEOUT_S``.

    Raises:
        SigningError: the variable is not a positive number of seconds.
    """
    text = os.environ.get(SIGN_TIMEOUT_ENV)
    if text is None:
        return SIGN_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SigningError(f"{SIGN_TIMEOUT_ENV}={text!r}: give a positive number of seconds")
    return value


def needs_token(href: str) -> bool:
    """Whether Planetary Computer's signer would sign ``href``: a blob on Azure Blob
    Storage, not the public thumbnails, not signed already."""
    url = urlparse(href.rstrip("/"))
    if not url.netloc.endswith(BLOB_DOMAIN) or url.netloc == PUBLIC_ACCOUNT:
        return False
    return not set(parse_qs(url.query)) & {"st", "se", "sp"}


def sign_assets(
    item: pystac.Item, keys: Iterable[str], signer: str | None, *, timeout_s: float | None = None
) -> pystac.Item:
    """A copy of ``item`` whose assets ``keys`` (only those: the ones a run reads) have
    signed hrefs; ``item`` itself when ``signer`` is None.

    Args:
        item: the STAC item.
        keys: the asset keys to sign.
        signer: ``planetary-computer`` or None (no signing).
        timeout_s: the token service's total budget for this item (default:
            :func:`default_timeout_s`).

    Raises:
        SigningError: the token service did not give a token within the budget, or refused.
    """
    if signer is None:
        return item
    if signer != "planetary-computer":
        raise ValueError(f"unknown signer {signer!r}; there is 'planetary-computer'")
    budget = default_timeout_s() if timeout_s is None else timeout_s
    deadline = time.monotonic() + budget
    out = item.clone()
    for key in dict.fromkeys(keys):
        asset = out.assets[key]
        if needs_token(asset.href):
            account, container = _blob(asset.href)
            token = _token(account, container, deadline, budget, item.id)
            asset.href = f"{asset.href}?{token.token}"
    return out


def _blob(href: str) -> tuple[str, str]:
    """``(account, container)`` of a blob URL."""
    url = urlparse(href)
    account = url.netloc.split(".")[0]
    container = url.path.lstrip("/").split("/")[0]
    return account, container


def _way_out(service: str) -> str:
    return (
        f"if the hrefs need no token (public or your own storage), run with --sign none "
        f"(sign: none under source: in a config); otherwise check the network to {service}, "
        f"or set PC_SDK_SAS_URL (another token service) or PC_SDK_SUBSCRIPTION_KEY"
    )


def _token(account: str, container: str, deadline: float, budget: float, item_id: str):
    """The container's SAS token: cached, or asked for until ``deadline`` (monotonic;
    ``budget`` seconds from the item's first ask)."""
    import planetary_computer.sas as sas
    import requests
    from planetary_computer.settings import Settings

    settings = Settings.get()
    url = f"{settings.sas_url}/{account}/{container}"
    token = sas.TOKEN_CACHE.get(url)
    if token is not None and token.ttl() >= 60:
        return token
    headers = (
        {"Ocp-Apim-Subscription-Key": settings.subscription_key}
        if settings.subscription_key
        else None
    )
    tries, error, refused = 0, "none: the budget was spent", False
    while (left := deadline - time.monotonic()) > 0:
        tries += 1
        try:
            response = requests.get(url, headers=headers, timeout=(left, left))
        except requests.RequestException as e:
            error = f"{type(e).__name__}: {e}"
        else:
            if response.ok:
                try:
                    token = sas.SASToken(**response.json())
                except ValueError as e:
                    raise SigningError(
                        f"cannot sign the hrefs of item {item_id}: the Planetary Computer "
                        f"token service ({settings.sas_url}) answered for container "
                        f"{account}/{container} without a token ({redact(str(e))[:200]})"
                    ) from None
                sas.TOKEN_CACHE[url] = token
                return token
            error = f"HTTP {response.status_code} {response.reason}"
            if response.status_code not in (408, 429) and response.status_code < 500:
                refused = True  # a bad subscription key, a container it does not serve
                break
        wait = BACKOFF_S[min(tries, len(BACKOFF_S)) - 1]
        time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
    what = "refused a token" if refused else f"gave no token within {budget:g} s"
    last = " ".join(redact(error).split())[:200]
    raise SigningError(
        f"cannot sign the hrefs of item {item_id}: the Planetary Computer token service "
        f"({settings.sas_url}) {what} for container {account}/{container} ({tries} "
        f"{'try' if tries == 1 else 'tries'}; last: {last}); {_way_out(settings.sas_url)}"
    )
