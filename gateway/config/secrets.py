"""Secrets in settings, masked wherever a setting is shown or logged."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

__all__ = ["redacted_url"]


def redacted_url(url: str) -> str:
    """``url`` with its user information and any ``password`` query parameter shown as ``***``.

    Everything between ``://`` and the last ``@`` is masked, whatever it
    holds: a password may contain ``#``, ``/``, ``?`` or ``@``, which a URL
    parser would take for the end of the authority.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    start = scheme_end + 3
    at = url.rfind("@", start)
    if at >= 0:
        url = url[:start] + "***" + url[at:]
        start += 3
    query_at = url.find("?", start)
    if query_at >= 0 and "password" in url[query_at:].lower():
        fragment_at = url.find("#", query_at)
        end = len(url) if fragment_at < 0 else fragment_at
        query = [(k, "***" if "password" in k.lower() else v)
                 for k, v in parse_qsl(url[query_at + 1:end], keep_blank_values=True)]
        url = url[:query_at + 1] + urlencode(query, safe="*/") + url[end:]
    return url
