"""Routes `urllib.request.urlopen` inside the sandbox through `capsule.http`, so common
pure-Python code that uses urllib works unchanged (and under the same `allowed_hosts`).

Installed when a task first imports `urllib.request`, not before: that module pulls in much of
the stdlib (and `random`, which each run must then reseed), which tasks that never use it
should not pay for.
"""


def install(request_module):
    """Make `request_module` (`urllib.request`) open http(s) URLs through the host."""
    import email.message
    import io
    import urllib.error
    import urllib.response

    from capsule import http

    class CapsuleHTTPHandler(request_module.BaseHandler):
        # Before urllib's own socket-based handlers.
        handler_order = 100

        def http_open(self, req):
            timeout = req.timeout if isinstance(req.timeout, (int, float)) else None
            try:
                response = http.request(
                    req.get_method(), req.full_url, headers=dict(req.header_items()), data=req.data, timeout=timeout
                )
            except http.HttpError as error:
                raise urllib.error.URLError(str(error)) from error
            headers = email.message.Message()
            for name, value in response.headers.items():
                headers[name] = value
            result = urllib.response.addinfourl(io.BytesIO(response.content), headers, response.url, response.status_code)
            result.msg = ""
            return result

        https_open = http_open

    request_module.install_opener(request_module.build_opener(CapsuleHTTPHandler))
