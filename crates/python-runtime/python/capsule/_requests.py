"""Routes `requests` inside the sandbox through `capsule.http`, so code written for
`requests` works unchanged (and under the same `allowed_hosts`).

Installed when a task's code first imports `requests.sessions`: every `Session` (and so
`requests.get` and friends) then mounts this adapter for http and https. The host verifies
certificates itself; `certifi.where()`, which requests calls at import, names the bundle by
its path in the sandbox instead of extracting it to a temporary file (there is none).
"""

import io

# Set by the client library itself; the host sets its own.
_HOST_MANAGED = {"content-length", "connection", "host", "transfer-encoding"}


def install(sessions_module):
    """Make `Session` (in `sessions_module`, `requests.sessions`) send through the host."""
    import http.client

    import requests.adapters
    import requests.exceptions
    import requests.models
    import requests.structures
    import requests.utils

    from capsule import http as capsule_http

    class CapsuleAdapter(requests.adapters.BaseAdapter):
        """A transport adapter whose requests the Capsule host makes."""

        def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
            if isinstance(timeout, tuple):  # (connect, read): the host has one deadline
                timeout = sum(part for part in timeout if part) or None
            body = request.body
            if hasattr(body, "read"):
                body = body.read()
            elif body is not None and not isinstance(body, (bytes, str)):
                body = b"".join(part if isinstance(part, bytes) else part.encode() for part in body)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOST_MANAGED}
            try:
                reply = capsule_http.request(request.method, request.url, headers=headers, data=body, timeout=timeout)
            except capsule_http.RequestTimeout as error:
                raise requests.exceptions.Timeout(str(error), request=request) from error
            except capsule_http.HttpError as error:
                raise requests.exceptions.ConnectionError(str(error), request=request) from error
            response = requests.models.Response()
            response.status_code = reply.status_code
            response.reason = http.client.responses.get(reply.status_code, "")
            response.headers = requests.structures.CaseInsensitiveDict(reply.headers)
            response.encoding = requests.utils.get_encoding_from_headers(response.headers)
            response.url = reply.url
            response.raw = io.BytesIO(reply.content)
            response._content = reply.content
            response.request = request
            response.connection = self
            return response

        def close(self):
            pass

    sessions_module.HTTPAdapter = CapsuleAdapter


def install_certifi(core_module):
    """Make `certifi.where()` (in `core_module`, `certifi.core`) return the bundle's path as
    the sandbox names it, without a file system."""
    import os

    path = os.path.join(os.path.dirname(core_module.__file__), "cacert.pem")
    core_module.where = lambda: path
