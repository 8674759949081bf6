"""HTTP for tasks: `get`, `post`, `put`, `delete`, `patch`, `head` and `request`.

Inside Capsule the host makes the request, and only to hosts the task lists in
`allowed_hosts`; a refused call raises `RequestRefused` naming the host and the rule. Under
plain Python (your unit tests) the same functions use `urllib` directly.
"""

import base64
import json as _json
import urllib.parse

try:
    import _capsule
except ImportError:  # plain Python, outside the sandbox
    _capsule = None

__all__ = [
    "HttpError", "RequestRefused", "RequestTimeout", "ResponseTooLarge", "Response",
    "request", "get", "post", "put", "delete", "patch", "head",
]


class HttpError(Exception):
    """An HTTP call that produced no response (not an error status: see `Response.ok`)."""


class RequestRefused(HttpError):
    """The task's `allowed_hosts` does not permit this host or address."""


class RequestTimeout(HttpError):
    """No response within the call's timeout or the task's remaining time."""


class ResponseTooLarge(HttpError):
    """The response body is larger than the host accepts."""


_ERRORS = {"refused": RequestRefused, "timeout": RequestTimeout, "too_large": ResponseTooLarge}


class Headers(dict):
    """Response headers; lookups ignore case."""

    def __init__(self, pairs):
        super().__init__()
        for name, value in pairs:
            key = name.lower()
            super().__setitem__(key, f"{self[key]}, {value}" if key in self else value)

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __contains__(self, name):
        return super().__contains__(name.lower())

    def get(self, name, default=None):
        return super().get(name.lower(), default)


class Response:
    def __init__(self, status_code, url, headers, content):
        self.status_code = status_code
        self.url = url
        self.headers = Headers(headers)
        self.content = content

    def ok(self):
        """Whether the status is 2xx."""
        return 200 <= self.status_code < 300

    def text(self):
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        return self.content.decode(charset, errors="replace")

    def json(self):
        return _json.loads(self.content)

    def __repr__(self):
        return f"<Response [{self.status_code}]>"


def _encode_body(headers, json, data):
    if json is not None:
        headers.setdefault("Content-Type", "application/json")
        return _json.dumps(json).encode()
    if isinstance(data, dict):
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return urllib.parse.urlencode(data).encode()
    if isinstance(data, str):
        return data.encode()
    return data


def request(method, url, *, params=None, headers=None, json=None, data=None, timeout=None):
    """Make an HTTP request and return its `Response` (whatever its status)."""
    if params:
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(params, doseq=True)
    headers = dict(headers or {})
    body = _encode_body(headers, json, data)
    if _capsule is None:
        return _request_directly(method, url, headers, body, timeout)
    call = {
        "method": "http.request",
        "request": {
            "method": method.upper(),
            "url": url,
            "headers": [[k, str(v)] for k, v in headers.items()],
            "body_base64": base64.b64encode(body).decode() if body is not None else None,
            "timeout": timeout,
        },
    }
    reply = _json.loads(_capsule.host_call(_json.dumps(call).encode()))
    if not reply["ok"]:
        error = reply["error"]
        raise _ERRORS.get(error["type"], HttpError)(f"{method.upper()} {url}: {error['message']}")
    response = reply["value"]
    return Response(response["status"], response["url"], response["headers"], base64.b64decode(response["body_base64"]))


def _request_directly(method, url, headers, body, timeout):
    import urllib.error
    import urllib.request

    outgoing = urllib.request.Request(url, data=body, headers=headers, method=method.upper())
    try:
        with urllib.request.urlopen(outgoing, timeout=timeout) as response:
            return Response(response.status, response.url, response.headers.items(), response.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, url, error.headers.items(), error.read())
    except TimeoutError as error:
        raise RequestTimeout(f"{method.upper()} {url}: {error}") from error
    except urllib.error.URLError as error:
        raise HttpError(f"{method.upper()} {url}: {error.reason}") from error


def get(url, **options):
    return request("GET", url, **options)


def post(url, **options):
    return request("POST", url, **options)


def put(url, **options):
    return request("PUT", url, **options)


def delete(url, **options):
    return request("DELETE", url, **options)


def patch(url, **options):
    return request("PATCH", url, **options)


def head(url, **options):
    return request("HEAD", url, **options)
