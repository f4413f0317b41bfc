"""Secrets in settings, masked wherever a setting is shown or logged."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

__all__ = ["redacted_url", "has_password", "URL_PARSE_ERROR", "SECRET_FLAG_MARK"]

#: Set (to the flag's name) by the PyPy restart of ``sluice serve``, which
#: moves a ``--redis`` URL holding a password out of the command line into
#: the environment: the warning about it must still be given.
SECRET_FLAG_MARK = "SLUICE_SECRET_WAS_FLAG"

#: The one message for a Redis URL that does not parse.  The parser's own
#: message is never shown: it quotes pieces of the URL, such as a password
#: taken for a port ("Port could not be cast to integer value as 'hunter2'").
URL_PARSE_ERROR = ("not a Redis URL: it does not parse (is a '#', '/', '?' or '@' in the "
                   "password percent-encoded, as %23, %2F, %3F, %40?)")


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


def has_password(url: str) -> bool:
    """Whether ``url`` holds user information or a password parameter (what is masked)."""
    return redacted_url(url) != url
